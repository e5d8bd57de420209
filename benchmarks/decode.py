"""`specdraft bench decode`: speculative vs autoregressive greedy decoding of SmolLM2, same run.

For each batch size and each (W, L): tokens/s of the fused speculative decode and of plain
autoregressive decode (`pipeline.generate`) on the same fixed chat prompts (each timed after a
compiling warm-up run), mean tokens per verify call (accepted + the bonus token), and one draft
step / one tree-verify step timed alone; `spec_step_ms` / `ar_step_ms` are the fused loops' wall
time per iteration (for spec: compare with draft_ms + verify_ms to see loop overhead). The
drafter is the shipped one when present, else `--drafter DIR`, else a fresh untrained one; the
JSON says which.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks import drafter as drafter_bench

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


def parse_beam(text: str):
    """ "2x3" -> BeamConfig(2, 3), through the drafter benchmark's parser."""
    from drafter.config import BeamConfig

    return BeamConfig(*drafter_bench.parse_beam(text))


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
        help="beam width x draft length (default: 1x4 2x3 4x4)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt")
    parser.add_argument("--devices", type=int, default=1, help="local devices to shard over")


def log(msg: str) -> None:
    print(f"[bench decode] {msg}", file=sys.stderr, flush=True)


def _load(args):
    from pipeline.drafter_io import DEFAULT_DRAFTER, load_drafter
    from pipeline.engine import fresh_drafter
    from pipeline.models import require_model
    from pipeline.tokenizer import Tokenizer
    from pipeline.weights import load_model

    path = require_model(args.model)
    llm_config, llm_params = load_model(path)
    tokenizer = Tokenizer.from_gguf(path)
    drafter_path = args.drafter or (DEFAULT_DRAFTER if DEFAULT_DRAFTER.is_dir() else None)
    if drafter_path is None:
        config, params = fresh_drafter(llm_config)
        return llm_config, llm_params, tokenizer, (config, params, None), "fresh (untrained)"
    d = load_drafter(drafter_path, llm_config)
    return llm_config, llm_params, tokenizer, (d.config, d.params, d.vocab_map), str(drafter_path)


def _chunks(batch: int) -> list[list[str]]:
    """Every prompt of PROMPTS once (cycled up to `batch` if larger), in batches of `batch`, so
    batch 1 and batch 8 decode the same prompts and one short answer cannot decide a case."""
    items = [PROMPTS[i % len(PROMPTS)] for i in range(max(batch, len(PROMPTS)))]
    return [items[i : i + batch] for i in range(0, len(items), batch)]


def _warm_then_time(fn, chunks):
    """Run `fn` over every chunk once (compiles), then again timed: (seconds, outputs)."""
    for chunk in chunks:
        fn(chunk)
    t0 = time.perf_counter()
    outs = [fn(chunk) for chunk in chunks]
    return time.perf_counter() - t0, outs


def _ar_speed(engine, chunks, max_new: int) -> tuple[float, float]:
    """(tokens/s, ms per decode step) of plain autoregressive decoding over all chunks."""
    import jax

    from pipeline.generate import generate

    def run(prompts):
        toks, lengths = engine._batch(prompts)
        out = generate(engine.llm_params, engine.llm_config, toks, lengths,
                       engine.config.sampling, jax.random.key(0), max_new)  # fmt: skip
        return jax.device_get(out)

    seconds, outs = _warm_then_time(run, chunks)
    tokens = sum(int(o.lengths.sum()) for o in outs)
    steps = sum(int(o.lengths.max()) for o in outs)
    return tokens / seconds, seconds * 1e3 / steps


def _spec_row(engine, chunks, beam, batch: int, ar) -> dict:
    """One result row: speculative decoding over all chunks, next to the AR figures."""
    run = lambda prompts: engine.generate_ids(prompts, list(range(len(prompts))))[0]
    seconds, outs = _warm_then_time(run, chunks)
    hist = sum(o.accepted.sum(0) for o in outs)
    draft_ms, verify_ms = engine.phase_times(chunks[0])
    return {
        "batch": batch,
        "width": beam.width,
        "length": beam.length,
        "prompts": sum(len(c) for c in chunks),
        "spec_tok_s": sum(int(o.lengths.sum()) for o in outs) / seconds,
        "ar_tok_s": ar[0],
        "speedup": sum(int(o.lengths.sum()) for o in outs) / seconds / ar[0],
        "accepted_per_call": float((hist * (1 + np.arange(hist.size))).sum() / hist.sum()),
        "draft_ms": draft_ms,
        "verify_ms": verify_ms,
        "spec_step_ms": seconds * 1e3 / sum(int(o.calls.max()) for o in outs),
        "ar_step_ms": ar[1],
    }


def run(args: argparse.Namespace) -> dict:
    from drafter.config import BeamConfig
    from pipeline.engine import Engine, EngineConfig

    beams = args.beams or [BeamConfig(1, 4), BeamConfig(2, 3), BeamConfig(4, 4)]
    llm_config, llm_params, tokenizer, drafter, drafter_source = _load(args)
    log(f"drafter: {drafter_source}")
    results = []
    for batch in args.batches:
        chunks = [[tokenizer.encode_chat([{"role": "user", "content": p}]) for p in chunk]
                  for chunk in _chunks(batch)]  # fmt: skip
        ar = None
        for beam in beams:
            config = EngineConfig(beam=beam, max_new_tokens=args.max_new_tokens,
                                  devices=args.devices, batch_size=batch)  # fmt: skip
            engine = Engine(config, llm_config, llm_params, *drafter, tokenizer, drafter_source)
            if ar is None:
                ar = _ar_speed(engine, chunks, args.max_new_tokens)
            row = _spec_row(engine, chunks, beam, batch, ar)
            log(str(row))
            results.append(row)
    return {
        "drafter": drafter_source,
        "prompts": list(PROMPTS),
        "max_new_tokens": args.max_new_tokens,
        "accepted_per_call_counts_bonus_token": True,
        "results": results,
    }
