"""`specdraft bench decode`: speculative vs autoregressive decoding of SmolLM2, same run.

For each batch size and each draft shape (`default`: the engine's own tree and adaptive policy,
with the sizes it chose per step in `steps_by_size`; WxL: that shape drafted in full every
step), greedy or at `--temperature`: tokens/s of the fused speculative decode and of plain
autoregressive decode (`pipeline.generate`) on the same fixed chat prompts, mean tokens per
verify call (accepted + the bonus token), how many rows equal their AR row token for token
(greedy: all of them, in fp32 and in bf16; see the README), and one draft step / one
tree-verify step timed alone (median of 5 runs).

Step costs: `spec_step_ms` / `ar_step_ms` are a whole call's wall time (prefill and the host round
trip included) over its loop iterations. `spec_loop_step_ms` / `ar_loop_step_ms` are the loop's
own: the same calls are also timed with a token limit of 1 (prefill and the first token, no loop
iteration; same compiled executable, the limit is an array), in the same rounds, and that time is
subtracted. `per_call_for_2x` = 2 x spec_loop / ar_loop: the tokens per call at which the loop
alone would run at twice AR's speed. `speedup_rounds` is `speedup` per timing round.

Timing: every case is compiled by a warm-up pass, then `--repeats` rounds, each running every
batch of prompts through AR, every W x L and then each of them prefill-only before the next batch,
and each figure is the median over rounds of a case's summed time. A busy or drifting machine
then shifts AR and spec alike instead of whichever case ran during a slow minute (the seconds of
every round are in the JSON).

The drafter is the shipped one when present, else `--drafter DIR`, else a fresh untrained one;
the JSON says which.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What is 17 times 23?",
)


DEFAULT = "default"  # `--beams default`: the engine's own tree and adaptive policy


def parse_beam(text: str):
    """ "2x3" -> BeamConfig(2, 3), "2x3r" -> the same per root, "default" -> DEFAULT (an
    argparse type)."""
    from drafter.config import BeamConfig

    if text == DEFAULT:
        return DEFAULT
    try:
        return BeamConfig.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_lookup(text: str) -> tuple[int, bool]:
    """ "4" -> (4, False): a 4-gram lookup candidate added; "4i" -> (4, True): in place of the
    last beam; "0" -> (0, False): none."""
    in_place = text.endswith("i")
    digits = text[:-1] if in_place else text
    if not digits.isdigit() or (in_place and int(digits) == 0):
        raise argparse.ArgumentTypeError(f"expected N or Ni with N >= 0 (Ni: N >= 1), got {text!r}")
    return int(digits), in_place


def _prompt_file(path: str):
    """A prompt file read as an argparse type: a malformed one is a usage error naming file and
    line, before any model loads."""
    from pipeline.prompts import PromptFileError, read_prompts

    try:
        read_prompts(path)
    except PromptFileError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF / HF folder (default: SmolLM2)")
    parser.add_argument("--drafter", default=None, help="drafter folder (default: shipped)")
    parser.add_argument("--batches", nargs="+", type=int, default=(1, 8), metavar="B",
                        help="prompts per batch, one case each (default: 1 8)")  # fmt: skip
    parser.add_argument(
        "--beams",
        nargs="+",
        type=parse_beam,
        default=None,
        metavar="WxL",
        help="beam width x draft length, a trailing r for per-root beams (BeamConfig.per_root), "
        "t for a best-first tree (BeamConfig.tree), each drafted at its full size every step; "
        "'default': the engine's default tree with its adaptive policy, as a user gets it, "
        "reported with the sizes it chose per step (default: default 1x1)",
    )
    parser.add_argument("--lookup", nargs="+", type=parse_lookup, default=[(0, False)],
                        metavar="N[i]", help="prompt lookup, each with every beam shape but "
                        "'default' (the engine's own): N adds a candidate copied after a repeated "
                        "n-gram of <= N tokens, Ni puts it in place of the last beam, 0 is off "
                        "(default: 0)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above: sampled, AR and speculative with the "
                             "same keys, so their rows are still identical")  # fmt: skip
    parser.add_argument("--prompts", type=_prompt_file, default=None, metavar="FILE",
                        help="decode these prompts (JSONL or text, as `specdraft generate` reads) "
                        "instead of the 8 built-in short questions")  # fmt: skip
    parser.add_argument("--num-prompts", type=_at_least_one, default=None, metavar="N",
                        help="use only the first N prompts")  # fmt: skip
    parser.add_argument("--devices", type=int, default=1, help="local devices to shard over")
    parser.add_argument("--repeats", type=_at_least_one, default=3,
                        help="interleaved timing rounds, medians reported (default 3)")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="target weights (activations and KV cache stay fp32)")  # fmt: skip
    parser.add_argument("--weights", nargs="+", choices=("fp32", "native"), default=None,
                        metavar="KIND",
                        help="the target's GGUF matrices dequantized to fp32 or held in their "
                             "blocks (EngineConfig.weights); each kind its own AR and spec cases, "
                             "all interleaved in one run (default: the engine's)")  # fmt: skip
    parser.add_argument("--matmul", choices=("auto", "kernel", "xla"), default="auto",
                        help="few-row matmuls through the CPU kernel or XLA's dot (AR and spec "
                             "alike; EngineConfig.matmul)")  # fmt: skip
    parser.add_argument("--draft-head-dtype", nargs="+", choices=("float32", "bfloat16"),
                        default=["bfloat16"], metavar="DTYPE",
                        help="with the kernel, the drafter's head rows in each of these dtypes, "
                             "each its own case (EngineConfig.draft_head_dtype)")  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench decode] {msg}", file=sys.stderr, flush=True)


def _load(args, weights: str = "fp32"):
    import jax.numpy as jnp

    from pipeline.drafter_io import DEFAULT_DRAFTER, load_drafter
    from pipeline.engine import fresh_drafter
    from pipeline.models import require_model
    from pipeline.tokenizer import Tokenizer
    from pipeline.weights import load_model

    path = require_model(args.model)
    llm_config, llm_params = load_model(path, jnp.dtype(args.dtype), weights == "native")
    tokenizer = Tokenizer.from_gguf(path)
    drafter_path = args.drafter or (DEFAULT_DRAFTER if DEFAULT_DRAFTER.is_dir() else None)
    if drafter_path is None:
        config, params = fresh_drafter(llm_config)
        return llm_config, llm_params, tokenizer, (config, params, None), "fresh (untrained)"
    d = load_drafter(drafter_path, llm_config)
    return llm_config, llm_params, tokenizer, (d.config, d.params, d.vocab_map), str(drafter_path)


def prompt_items(path=None, limit=None) -> list:
    """The PromptItems to decode: the built-in PROMPTS, or a prompt file's (the first `limit`)."""
    from pipeline.prompts import PromptItem, read_prompts

    if path is None:
        items = [PromptItem(id=str(i), prompt=p) for i, p in enumerate(PROMPTS)]
    else:
        items = read_prompts(path).items
    return items[:limit]


def _chunks(prompts: list, batch: int) -> list[list]:
    """Every prompt once (cycled up to `batch` if larger), in batches of `batch`, so batch 1 and
    batch 8 decode the same prompts and one short answer cannot decide a case."""
    items = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
    return [items[i : i + batch] for i in range(0, len(items), batch)]


def _timed(fn, chunks):
    """One pass of `fn` over every chunk: (seconds, outputs)."""
    t0 = time.perf_counter()
    outs = [fn(chunk) for chunk in chunks]
    return time.perf_counter() - t0, outs


def _ar_runner(engine, max_new: int, limit: int | None = None):
    """prompts -> Generated of plain autoregressive decoding, on the engine's model.

    Compiled for `max_new` tokens; `limit` (<= max_new) lowers the rows' limit in the same
    executable (1: prefill and first token only)."""
    import jax
    import jax.numpy as jnp

    from pipeline.generate import generate_core

    def run(prompts):
        toks, lengths = engine._batch(prompts)
        b, cfg = len(prompts), engine.llm_config
        rows_max = jnp.full((b,), max_new if limit is None else limit, jnp.int32)
        out = generate_core(engine.llm_params, toks, lengths, rows_max, jax.random.key(0),
                            jnp.arange(b, dtype=jnp.int32), config=cfg,
                            sampling=engine.config.sampling, num_tokens=max_new,
                            eos_ids=cfg.eos_token_ids)  # fmt: skip
        return jax.device_get(out)

    return run


def _interleaved(runners, chunks, repeats: int):
    """Warm every runner up, then `repeats` rounds; in each round every chunk is run by every
    runner in turn before the next chunk, and a runner's round time is the sum over chunks.

    Interleaving chunk by chunk (rather than whole passes) keeps the cases seconds apart, so a
    machine that drifts within a round slows them alike.
    -> per runner (list of seconds per round, outputs of the last round)."""
    for fn in runners:
        _timed(fn, chunks)
    seconds = [[] for _ in runners]
    outs = [[None] * len(chunks) for _ in runners]
    for r in range(repeats):
        log(f"timing round {r + 1}/{repeats}")
        took = [0.0] * len(runners)
        for c, chunk in enumerate(chunks):
            for i, fn in enumerate(runners):
                t0 = time.perf_counter()
                outs[i][c] = fn(chunk)
                took[i] += time.perf_counter() - t0
        for i, t in enumerate(took):
            seconds[i].append(t)
    return seconds, outs


def _loop_ms(whole: list[float], prefill: list[float], steps: int) -> float | None:
    """ms per loop iteration: the median over rounds of (whole pass - prefill pass) / steps."""
    if steps < 1:
        return None
    return statistics.median(w - p for w, p in zip(whole, prefill, strict=True)) * 1e3 / steps


def _row(engine, chunks, beam, batch: int, spec, ar, spec_prefill, ar_prefill) -> dict:
    """One result row from (seconds per round, outputs) of spec and of AR decoding, and the
    seconds per round of their prefill-only passes."""
    spec_s, ar_s = statistics.median(spec[0]), statistics.median(ar[0])
    spec_tokens = sum(int(o.lengths.sum()) for o in spec[1])
    ar_tokens = sum(int(o.lengths.sum()) for o in ar[1])
    hist = sum(o.accepted.sum(0) for o in spec[1])
    drafted = sum(int(o.drafted.sum()) for o in spec[1])
    row_calls = sum(int(o.calls.sum()) for o in spec[1])
    same = [
        int(s.lengths[i]) == int(a.lengths[i])
        and bool((s.tokens[i, : s.lengths[i]] == a.tokens[i, : a.lengths[i]]).all())
        for s, a in zip(spec[1], ar[1], strict=True)
        for i in range(len(s.lengths))
    ]
    draft_ms, verify_ms = engine.phase_times(chunks[0])
    spec_steps = sum(int(o.calls.max()) for o in spec[1])
    # AR's first token comes from the prefill; each further one is a loop iteration.
    ar_steps = sum(int(o.lengths.max()) - 1 for o in ar[1])
    spec_loop = _loop_ms(spec[0], spec_prefill, spec_steps)
    ar_loop = _loop_ms(ar[0], ar_prefill, ar_steps)
    return {
        "batch": batch,
        "width": beam.width,
        "length": beam.length,
        "per_root": beam.per_root,
        "tree": beam.tree,
        "cuts": list(beam.cuts),
        "policy": "adaptive" if engine.config.adaptive else "fixed",
        "step_costs": engine.costs_for(batch).as_dict(),
        # Verify steps (summed over rows) by the drafted tokens verified; "0": AR steps.
        "steps_by_size": {
            str(k): int(n)
            for k, n in zip(
                (0, *beam.verify_sizes), sum(o.by_size.sum(0) for o in spec[1]), strict=True
            )
        },
        "lookup": engine.config.lookup,
        "lookup_in_place": engine.config.lookup_in_place,
        # ms of one row through the head from [V, D] and from [D, V], as the engine measured
        # them (`EngineConfig.probe_head_layout`); the faster serves AR's one-row steps.
        "head_one_row_ms": engine.head_one_row_ms,
        # The target's few-row matmuls, AR's and spec's alike: "kernel" (`pipeline.kernels`) or
        # "xla" (`EngineConfig.matmul`).
        "matmul": engine.matmul,
        # The drafter's head rows as the kernel reads them (`EngineConfig.draft_head_dtype`);
        # XLA's path keeps them fp32.
        "draft_head_dtype": (
            engine.config.draft_head_dtype if engine.matmul == "kernel" else "float32"
        ),
        "prompts": sum(len(c) for c in chunks),
        "spec_tok_s": spec_tokens / spec_s,
        "ar_tok_s": ar_tokens / ar_s,
        "speedup": (spec_tokens / spec_s) / (ar_tokens / ar_s),
        # The same ratio per round (a round runs AR and spec on each batch in turn): its spread
        # shows how much of a difference between cases is the machine's drift.
        "speedup_rounds": [
            round((spec_tokens / s) / (ar_tokens / a), 3)
            for s, a in zip(spec[0], ar[0], strict=True)
        ],
        "rows_identical_to_ar": sum(same),
        "accepted_per_call": float((hist * (1 + np.arange(hist.size))).sum() / hist.sum()),
        "drafted_per_call": drafted / row_calls if row_calls else None,
        "draft_ms": draft_ms,
        "verify_ms": verify_ms,
        "spec_step_ms": spec_s * 1e3 / spec_steps,
        "ar_step_ms": ar_s * 1e3 / sum(int(o.lengths.max()) for o in ar[1]),
        "spec_loop_steps": spec_steps,
        "ar_loop_steps": ar_steps,
        "spec_loop_step_ms": spec_loop,
        "ar_loop_step_ms": ar_loop,
        "per_call_for_2x": 2 * spec_loop / ar_loop if spec_loop and ar_loop else None,
        "spec_seconds": [round(x, 3) for x in spec[0]],
        "ar_seconds": [round(x, 3) for x in ar[0]],
        "spec_prefill_seconds": [round(x, 3) for x in spec_prefill],
        "ar_prefill_seconds": [round(x, 3) for x in ar_prefill],
    }


def _ratio(a, b) -> float:
    """tokens/s of (seconds per round, outputs) `a` over `b`'s, medians over rounds."""
    tok_s = lambda r: sum(int(o.lengths.sum()) for o in r[1]) / statistics.median(r[0])
    return tok_s(a) / tok_s(b)


def decode_weight_bytes(params) -> int:
    """Bytes of weights one decode step reads from held params (`Engine.llm_params`): each layer
    matrix in the form the step multiplies (a `PackedWeight`'s panels, not its prefill copy; a
    `QuantWeight`'s blocks), the norms, and the output head once (a table held twice, as the
    embedding and as the packed head, is read once: the embedding gives only a row per token)."""
    import jax

    from pipeline import kernels
    from pipeline.llm import HEAD_PACKED

    def size(w) -> int:
        if isinstance(w, kernels.PackedWeight):
            return int(w.packed.nbytes)
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(w))

    head = params.get(HEAD_PACKED, params.get("lm_head", params["embed"]))
    if "head_t" in params:
        head = params["head_t"]
    total = size(head) + size(params["final_norm"])
    return total + sum(size(w) for layer in params["layers"] for w in layer.values())


def run(args: argparse.Namespace) -> dict:
    from drafter.config import BeamConfig
    from drafter.sampling import SamplingConfig
    from pipeline.distill import encode_prompts
    from pipeline.engine import Engine, EngineConfig

    beams = args.beams or [DEFAULT, BeamConfig(1, 1)]
    sampling = SamplingConfig(temperature=args.temperature)
    items = prompt_items(args.prompts, args.num_prompts)
    kinds = args.weights or [EngineConfig(dtype=args.dtype).weights]
    if "native" in kinds and args.dtype != "float32":
        raise ValueError(f"bench decode: --weights native expands to fp32; --dtype is {args.dtype}")
    loaded = {kind: _load(args, kind) for kind in kinds}
    _, _, tokenizer, _, drafter_source = loaded[kinds[0]]
    log(f"drafter: {drafter_source}")
    # Rendered as the engine and the trainer render them, through the model's chat template.
    encoded = encode_prompts(tokenizer, items)
    results = []
    for batch in args.batches:
        chunks = _chunks(encoded, batch)
        cases = [(beam, lookup, head) for head in args.draft_head_dtype for lookup in args.lookup
                 for beam in beams]  # fmt: skip
        # `default` takes the engine's own lookup: once, whatever --lookup lists.
        cases = [c for i, c in enumerate(cases) if c[0] != DEFAULT or
                 all(d[0] != DEFAULT or d[2] != c[2] for d in cases[:i])]  # fmt: skip
        engines = {kind: [] for kind in kinds}
        for kind in kinds:
            llm_config, llm_params, tokenizer, drafter, drafter_source = loaded[kind]
            for beam, (lookup, in_place), head in cases:
                shape = ({} if beam == DEFAULT else
                         {"beam": beam, "adaptive": False, "lookup": lookup,
                          "lookup_in_place": in_place})  # fmt: skip
                config = EngineConfig(**shape, sampling=sampling,
                                      max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                      weights=kind, matmul=args.matmul, devices=args.devices,
                                      batch_size=batch, draft_head_dtype=head)  # fmt: skip
                engines[kind].append(
                    Engine(config, llm_config, llm_params, *drafter, tokenizer, drafter_source)
                )

        def spec_runner(engine, limit=None):
            return lambda prompts: engine.generate_ids(prompts, list(range(len(prompts))), limit)[0]

        log(f"batch {batch}: compiling AR and {len(cases)} draft shapes, weights {kinds}")
        # Per weights kind: AR, each case; then the same calls limited to one token (prefill
        # only). Every runner of every kind is interleaved with the others.
        runners = []
        for kind in kinds:
            runners += [_ar_runner(engines[kind][0], args.max_new_tokens)]
            runners += [spec_runner(e) for e in engines[kind]]
            runners += [_ar_runner(engines[kind][0], args.max_new_tokens, limit=1)]
            runners += [spec_runner(e, limit=1) for e in engines[kind]]
        seconds, outs = _interleaved(runners, chunks, args.repeats)
        n = len(cases) + 1
        first_ar = None
        for k, kind in enumerate(kinds):
            base = 2 * n * k
            # A prefill-only pass must not enter the loop: AR's first token is the prefill's.
            iterations = [int(o.lengths.max()) - 1 for o in outs[base + n]]
            iterations += [int(o.calls.max()) for out in outs[base + n + 1 : base + 2 * n]
                           for o in out]  # fmt: skip
            if any(iterations):
                raise RuntimeError(f"a prefill-only pass ran loop iterations: {iterations}")
            ar = (seconds[base], outs[base])
            first_ar = first_ar or (kind, ar)
            for i, engine in enumerate(engines[kind]):
                beam = engine.config.beam
                spec = (seconds[base + i + 1], outs[base + i + 1])
                row = _row(engine, chunks, beam, batch, spec, ar, seconds[base + n + i + 1],
                           seconds[base + n])  # fmt: skip
                row["weights"] = kind
                row["weight_bytes_per_step"] = decode_weight_bytes(engine.llm_params)
                # Against the first kind's AR in the same rounds (`--weights fp32 native`: how
                # much faster the native engine is than the fp32 AR baseline).
                row["baseline_ar"] = first_ar[0]
                row["speedup_vs_baseline_ar"] = _ratio(spec, first_ar[1])
                row["ar_speedup_vs_baseline_ar"] = _ratio(ar, first_ar[1])
                log(str(row))
                results.append(row)
    return {
        "drafter": drafter_source,
        "prompts_file": args.prompts,
        "prompts": [
            item.prompt if item.prompt is not None else list(item.messages) for item in items
        ],  # fmt: skip
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "dtype": args.dtype,
        "weights": kinds,
        "matmul": args.matmul,
        "repeats": args.repeats,
        "accepted_per_call_counts_bonus_token": True,
        "results": results,
    }
