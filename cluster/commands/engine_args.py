"""Engine flags of `generate` and `draft`, turned into a picklable engine factory.

The factory is built here, in the driver, and called inside each worker (or in this process
without Ray), so flags are parsed once and weights are loaded where they are used.
`--engine-factory MODULE:ATTR` replaces the real engine with any zero-argument callable that
returns an object with `generate(items)` / `draft(items)` (e.g. the test engine
`cluster.testing:EchoEngine.from_env`); it is for tests, benchmarks and custom engines.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from cluster.cli import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument("--model", default=None, help="target .gguf or HF folder (default: "
                        "SmolLM2-135M from `specdraft fetch-model`)")  # fmt: skip
    engine.add_argument("--drafter", default=None, help="drafter folder (default: shipped)")
    engine.add_argument("--beam-width", type=int, default=4, help="draft beams per step (W)")
    engine.add_argument("--beam-length", type=int, default=4, help="drafted tokens per beam (L)")
    engine.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt")
    engine.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    engine.add_argument("--top-k", type=int, default=None, help="sample from the top k")
    engine.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    engine.add_argument("--seed", type=int, default=0, help="sampling seed")
    engine.add_argument(
        "--engine-factory",
        default=None,
        metavar="MODULE:ATTR",
        help="advanced: a zero-argument callable building the engine (tests, custom engines)",
    )


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    if args.engine_factory:
        return load_callable(args.engine_factory)
    from cluster.worker import EngineFactory
    from drafter.config import BeamConfig
    from drafter.sampling import SamplingConfig
    from pipeline.engine import EngineConfig

    try:
        config = EngineConfig(
            model=args.model,
            drafter=args.drafter,
            beam=BeamConfig(width=args.beam_width, length=args.beam_length),
            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    return EngineFactory(config)


def load_callable(spec: str) -> Callable[[], Any]:
    """`package.module:Name.attr` -> the object (picklable by reference, so Ray can ship it)."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UserError(f"--engine-factory {spec!r}: expected MODULE:ATTR")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--engine-factory {spec!r}: {err}") from None
    if not callable(target):
        raise UserError(f"--engine-factory {spec!r} is not callable")
    return target
