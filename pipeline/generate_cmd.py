"""Single-host generation without Ray: engine flags -> EngineConfig, prompts -> JSONL results.

The Ray layer (`specdraft generate`, cluster/) owns the user-facing command; it can reuse
`add_engine_arguments` / `engine_config_from_args` for the engine's flags and host an `Engine`
built from the resulting `EngineConfig`. `python -m pipeline.generate_cmd --prompts FILE --out
OUT.jsonl` runs the same engine in this process (prompts go through the model's chat template).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from drafter.config import BeamConfig
from drafter.sampling import SamplingConfig
from pipeline.engine import DRAFT_METHODS, DTYPES, MATMULS, WEIGHTS, Engine, EngineConfig

DEFAULTS = EngineConfig()
DRAFT_COMMAND_METHODS = ("beam", "sample", "tree")
DRAFT_SHAPE = BeamConfig(width=4, length=5)  # `specdraft draft`'s default W x L
# `generate --draft-method sample` without a shape: sampled paths do not form a best-first tree.
SAMPLE_SHAPE = BeamConfig(width=1, length=4)


def add_engine_arguments(parser: argparse.ArgumentParser, kind: str = "generate") -> None:
    """The engine's flags for `kind`: "generate" (speculative decoding) or "draft" (drafts only:
    no decoding flags)."""
    if kind == "draft":
        _add_draft_arguments(parser)
    else:
        _add_decode_arguments(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    g.add_argument("--drafter", default=None, help="drafter folder (default: the shipped one)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--devices", type=int, default=None, help="local devices (default: all)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="prompts per batch")  # fmt: skip
    g.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="sampling key (with the prompt's id)")  # fmt: skip
    g.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype,
                   help="target weights (the KV cache stays fp32); bfloat16 halves their memory, "
                        "greedy output stays exactly AR's (README)")  # fmt: skip
    g.add_argument("--weights", choices=WEIGHTS, default=DEFAULTS.weights,
                   help="a GGUF target's quantized matrices: native keeps them in their blocks "
                        "(about 5x less memory) and expands them in the kernel to the values fp32 "
                        "dequantizes at load: the same output, bit for bit")  # fmt: skip
    g.add_argument("--matmul", choices=MATMULS, default=DEFAULTS.matmul,
                   help="the target's few-row matmuls: the small-M CPU kernel (built with g++ on "
                        "first use), XLA's dot, or auto: the kernel where it applies")  # fmt: skip


def _add_draft_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("drafting")
    g.add_argument("--method", choices=DRAFT_COMMAND_METHODS, default="beam",
                   help="beam: the reference's beam search (W beams, best first); sample: W "
                        "independent samples from the drafter (temperature, top-k, top-p); tree: "
                        "the best-first tree of L drafted tokens from the top-W children of each "
                        "(its L root-to-node paths). Default beam")  # fmt: skip
    g.add_argument("--width", type=int, default=DRAFT_SHAPE.width,
                   help=f"W: drafts per prompt (tree: children per node; default "
                        f"{DRAFT_SHAPE.width})")  # fmt: skip
    g.add_argument("--length", type=int, default=DRAFT_SHAPE.length,
                   help=f"L: tokens per draft (tree: drafted tokens; default "
                        f"{DRAFT_SHAPE.length})")  # fmt: skip
    g.add_argument("--temperature", type=float, default=None,
                   help="for the LLM's token and the samples (default: 1.0 with --method sample, "
                        "the drafter's own distribution; else 0, greedy)")  # fmt: skip
    g.add_argument("--log-probs", action="store_true",
                   help="also write each drafted token's log-probability")  # fmt: skip


def _add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding")
    tree = DEFAULTS.beam
    g.add_argument("--width", type=int, default=None,
                   help=f"beam width W, or with --tree the children each node offers (default: "
                        f"{tree.width})")  # fmt: skip
    g.add_argument("--length", type=int, default=None,
                   help=f"draft length L, or with --tree the drafted tokens (default: "
                        f"{tree.length})")  # fmt: skip
    g.add_argument("--per-root", action=argparse.BooleanOptionalAction, default=None,
                   help="each of the top-W first tokens grows its own beam "
                        "(BeamConfig.per_root)")  # fmt: skip
    g.add_argument("--tree", action=argparse.BooleanOptionalAction, default=None,
                   help="draft a best-first tree of L tokens from the top-W children of each "
                        "(BeamConfig.tree; the default); --width/--length without it: W beams of "
                        "L tokens")  # fmt: skip
    g.add_argument("--cuts", type=int, nargs="*", default=None, metavar="K",
                   help="the smaller sizes (drafted tokens) a best-first tree may be drafted and "
                        "verified at, chosen per step by expected tokens per second on this "
                        "machine (BeamConfig.cuts; `--cuts` alone: the full tree or none; "
                        f"default: {' '.join(map(str, tree.cuts))})")  # fmt: skip
    g.add_argument("--fixed", dest="adaptive", action="store_false",
                   help="no measured step costs: always draft, sizes by BeamConfig.node_cost's "
                        "linear model (EngineConfig.adaptive off)")  # fmt: skip
    g.add_argument("--no-draft", dest="speculate", action="store_false",
                   help="plain autoregressive decoding (same engine, batching and keys, no "
                        "drafter): the baseline to compare with; the same output, token for "
                        "token, at any temperature")  # fmt: skip
    g.add_argument("--draft-method", choices=DRAFT_METHODS, default=DEFAULTS.draft_method,
                   help="beam: the drafter's beam search or tree (above); sample: W independent "
                        "samples from the drafter at the decoding temperature, top-k and top-p "
                        "(for temperature > 0; output is the same law either way)")  # fmt: skip
    g.add_argument("--lookup", type=int, default=DEFAULTS.lookup, metavar="N",
                   help="add a draft copied from the context after its longest repeated n-gram "
                        "of <= N tokens (0: drafter only; default 4)")  # fmt: skip
    g.add_argument("--lookup-in-place", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS.lookup_in_place,
                   help="put the lookup draft in place of the last beam (when it matched >= 2 "
                        "tokens) instead of adding one: the tree keeps its size")  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help="answer length cap")  # fmt: skip


def draft_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of `add_engine_arguments(parser, "draft")` flags: one W x L shape for
    every batch, no lookup (errors name the flag)."""
    for flag in ("width", "length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    sample = args.method == "sample"
    temperature = (1.0 if sample else 0.0) if args.temperature is None else args.temperature
    return EngineConfig(
        model=args.model,
        drafter=args.drafter,
        beam=BeamConfig(width=args.width, length=args.length, tree=args.method == "tree"),
        lookup=0,
        draft_method="sample" if sample else "beam",
        draft_log_probs=args.log_probs,
        sampling=SamplingConfig(temperature, args.top_k, args.top_p),
        max_new_tokens=2,  # the LLM's first token; drafting needs room for L more
        devices=args.devices,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        weights=args.weights,
        matmul=args.matmul,
        time_phases=False,
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig that `add_engine_arguments` flags describe (errors name the field).

    No --width/--length/--per-root/--tree: the default tree, `EngineConfig.beam`. Any of them:
    W beams of L tokens, or with --tree a best-first tree (W and L from the default where not
    given; the default's cuts that fit). --cuts sets the tree's cuts."""
    default = DEFAULTS.beam
    beam = default
    if any(flag is not None for flag in (args.width, args.length, args.per_root, args.tree)):
        width = default.width if args.width is None else args.width
        length = default.length if args.length is None else args.length
        tree = bool(args.tree)
        cuts = tuple(k for k in default.cuts if k < length) if tree else ()
        beam = BeamConfig(width, length, bool(args.per_root), tree, cuts)
    cuts = getattr(args, "cuts", None)
    if cuts is not None:
        if not beam.tree:
            raise ValueError(f"--cuts {' '.join(map(str, cuts))}: cuts apply to a best-first "
                             "tree (--tree)")  # fmt: skip
        beam = dataclasses.replace(beam, cuts=tuple(cuts))
    if args.draft_method == "sample" and beam.tree:
        beam = SAMPLE_SHAPE if beam == default else beam
    return EngineConfig(
        model=args.model,
        drafter=args.drafter,
        beam=beam,
        adaptive=args.adaptive,
        lookup=args.lookup,
        lookup_in_place=args.lookup_in_place,
        draft_method=args.draft_method,
        speculate=args.speculate,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
        max_new_tokens=args.max_new_tokens,
        devices=args.devices,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        weights=args.weights,
        matmul=args.matmul,
    )


def generate_local(config: EngineConfig, items) -> list[dict]:
    """PromptItems -> result dicts, in this process on local devices."""
    return Engine.from_config(config).generate(list(items))


def write_jsonl(results: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for record in results:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    from pipeline.prompts import read_prompts

    parser = argparse.ArgumentParser(prog="python -m pipeline.generate_cmd", description=__doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL or text prompt file")
    parser.add_argument("--out", type=Path, required=True, help="results, one JSON a line")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        prompts = read_prompts(args.prompts)
    except ValueError as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2
    write_jsonl(prompts.errors + generate_local(config, prompts.items), args.out)
    print(f"generate: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
