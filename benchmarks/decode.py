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
    from drafter.config import BeamConfig

    try:
        w, length = (int(x) for x in text.lower().split("x"))
        return BeamConfig(w, length)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxL like 4x4, got {text!r}") from None


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


def _timed_twice(fn):
    """Compile + run, then a timed run: (seconds, result)."""
    fn()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


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


def _ar_speed(engine, prompts, max_new: int) -> tuple[float, float]:
    """(tokens/s, ms per decode step) of plain autoregressive decoding."""
    import jax
    import jax.numpy as jnp

    from pipeline.generate import generate

    toks, lengths = engine._batch(prompts)
    c = engine.llm_config
    run = lambda: jax.block_until_ready(
        generate(
            engine.llm_params, c, toks, lengths, engine.config.sampling, jax.random.key(0), max_new
        )
    )
    seconds, out = _timed_twice(run)
    return float(jnp.sum(out.lengths)) / seconds, seconds * 1e3 / float(jnp.max(out.lengths))


def run(args: argparse.Namespace) -> dict:
    from drafter.config import BeamConfig
    from pipeline.engine import Engine, EngineConfig

    beams = args.beams or [BeamConfig(1, 4), BeamConfig(2, 3), BeamConfig(4, 4)]
    llm_config, llm_params, tokenizer, drafter, drafter_source = _load(args)
    log(f"drafter: {drafter_source}")
    results = []
    for batch in args.batches:
        items = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in items]
        ar = None
        for beam in beams:
            config = EngineConfig(
                beam=beam,
                max_new_tokens=args.max_new_tokens,
                devices=args.devices,
                batch_size=batch,
            )
            engine = Engine(
                config,
                llm_config,
                llm_params,
                drafter[0],
                drafter[1],
                drafter[2],
                tokenizer,
                drafter_source,
            )
            if ar is None:
                ar = _ar_speed(engine, prompts, args.max_new_tokens)
            ids = list(range(batch))
            seconds, (out, _) = _timed_twice(
                lambda e=engine, p=prompts, i=ids: e.generate_ids(p, i)
            )
            draft_ms, verify_ms = engine.phase_times(prompts)
            hist = out.accepted.sum(0)
            per_call = float((hist * (1 + np.arange(hist.size))).sum() / hist.sum())
            row = {
                "batch": batch,
                "width": beam.width,
                "length": beam.length,
                "spec_tok_s": float(out.lengths.sum()) / seconds,
                "ar_tok_s": ar[0],
                "accepted_per_call": per_call,
                "draft_ms": draft_ms,
                "verify_ms": verify_ms,
                "spec_step_ms": seconds * 1e3 / int(out.calls.max()),
                "ar_step_ms": ar[1],
            }
            log(str(row))
            results.append(row)
    return {
        "drafter": drafter_source,
        "max_new_tokens": args.max_new_tokens,
        "accepted_per_call_counts_bonus_token": True,
        "results": results,
    }
