"""`specdraft bench accept`: tokens per LLM call of the real engine on held-out prompts (greedy by
default; `--temperature` samples, and `--draft-methods beam sample` compares the drafter's beams
with its independent samples there).

`specdraft train` reports the drafter's held-out acceptance by replaying its beam search against
the LLM's cached answers (`pipeline.distill_eval`). This runs the engine itself instead (prefill,
draft, tree verification, acceptance), so it also measures what the engine adds around the
drafter, such as the prompt-lookup candidate (`--lookup`), which needs the prompt the cached
answers do not keep. With `--lookup 0` it is a cross-check of the replay: both decode the same
greedy answers.

Per case: calls (verify steps, prefill not counted), the answer tokens those calls produced (each
answer's first token comes from the prefill), tokens per call (accepted drafts + the bonus
token), and per-depth acceptance (the fraction of calls that accepted at least d drafts), pooled
over all prompts. Timing is not the point here (see `bench decode`), but each case's seconds
are recorded.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks import decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF / HF folder (default: SmolLM2)")
    parser.add_argument("--drafter", default=None, help="drafter folder (default: shipped)")
    parser.add_argument("--prompts", type=decode._prompt_file, default=None, metavar="FILE",
                        help="prompts (default: the shipped held-out prompts)")  # fmt: skip
    parser.add_argument("--num-prompts", type=decode._at_least_one, default=None, metavar="N",
                        help="use only the first N prompts")  # fmt: skip
    parser.add_argument("--beams", nargs="+", type=decode.parse_beam, default=None, metavar="WxL",
                        help="beam width x draft length, r: per root, t: a best-first tree "
                             "(default: 1x1 1x4 2x4)")  # fmt: skip
    parser.add_argument(
        "--lookup",
        nargs="+",
        type=decode.parse_lookup,
        default=[(0, False), (4, False), (4, True)],
        metavar="N[i]",
        help="prompt lookup as in `bench decode` (default: 0 4 4i)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=decode._at_least_one,
        default=128,
        help="answer length cap (default 128, as in the training data)",
    )
    parser.add_argument("--batch", type=decode._at_least_one, default=16, help="prompts per call")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="decoding temperature (0: greedy, default)")  # fmt: skip
    parser.add_argument("--draft-methods", nargs="+", choices=("beam", "sample"),
                        default=["beam"], help="how the drafter proposes (EngineConfig."
                        "draft_method); each is a case (default: beam)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="sampling key")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="target weights (activations and KV cache stay fp32)")  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench accept] {msg}", file=sys.stderr, flush=True)


def pooled(outs) -> dict:
    """SpecOut batches -> pooled calls, tokens per call and per-depth acceptance.

    As in `pipeline.distill_eval`: each answer's first token comes from the prefill and the calls
    emit the rest, so tokens per call = (answer tokens - answers) / calls. The histogram of
    accepted draft lengths also counts drafts that a row's token cap or EOS then cut, so
    `sum((n + 1) * hist[n])` can exceed the emitted tokens by up to L per answer.
    """
    hist = sum(np.asarray(o.accepted).sum(0) for o in outs)
    calls = int(hist.sum())
    answers = int(sum(len(o.lengths) for o in outs))
    answer_tokens = int(sum(np.asarray(o.lengths).sum() for o in outs))
    at_least = hist[::-1].cumsum()[::-1][1:] / max(calls, 1)
    return {
        "answers": answers,
        "answer_tokens": answer_tokens,
        "calls": calls,
        "tokens_per_call": (answer_tokens - answers) / max(calls, 1),
        "per_depth_acceptance": [round(float(x), 4) for x in at_least],
        "accepted_histogram": [int(x) for x in hist],
    }


def run(args: argparse.Namespace) -> dict:
    from drafter.config import BeamConfig
    from drafter.sampling import SamplingConfig
    from pipeline.distill import HELDOUT_PROMPTS, encode_prompts
    from pipeline.engine import Engine, EngineConfig, row_id

    prompts_file = args.prompts or str(HELDOUT_PROMPTS)
    beams = args.beams or [BeamConfig(1, 1), BeamConfig(1, 4), BeamConfig(2, 4)]
    items = decode.prompt_items(prompts_file, args.num_prompts)
    llm_config, llm_params, tokenizer, drafter, drafter_source = decode._load(args)
    log(f"drafter: {drafter_source}; {len(items)} prompts")
    encoded = encode_prompts(tokenizer, items)
    chunks = [encoded[i : i + args.batch] for i in range(0, len(encoded), args.batch)]
    sampling = SamplingConfig(temperature=args.temperature)
    ids = [row_id(item.id) for item in items]
    id_chunks = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
    results = []
    for lookup, in_place in args.lookup:
        for beam in beams:
            for method in args.draft_methods:
                config = EngineConfig(beam=beam, lookup=lookup,
                                      lookup_in_place=in_place, draft_method=method,
                                      sampling=sampling, seed=args.seed,
                                      max_new_tokens=args.max_new_tokens,
                                      dtype=args.dtype, batch_size=args.batch,
                                      time_phases=False)  # fmt: skip
                engine = Engine(config, llm_config, llm_params, *drafter, tokenizer,
                                drafter_source)  # fmt: skip
                t0 = time.perf_counter()
                outs = [
                    engine.generate_ids(c, i)[0] for c, i in zip(chunks, id_chunks, strict=True)
                ]
                row = {"width": beam.width, "length": beam.length, "per_root": beam.per_root,
                       "tree": beam.tree, "cuts": list(beam.cuts), "lookup": lookup,
                       "lookup_in_place": in_place, "draft_method": method,
                       **pooled(outs), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                log(str(row))
                results.append(row)
    return {
        "drafter": drafter_source,
        "prompts_file": args.prompts or "pipeline/data/heldout_prompts.jsonl",
        "num_prompts": len(items),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "dtype": args.dtype,
        "tokens_per_call_counts_bonus_token": True,
        "results": results,
    }
