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


def add_arguments(parser: argparse.ArgumentParser, kind: str = "generate") -> None:
    """The engine's own flags for `kind` (pipeline.generate_cmd, one definition for every entry
    point, `--batch-size` included: the coordinator's batches are the engine's) +
    --engine-factory."""
    from pipeline.generate_cmd import add_engine_arguments

    add_engine_arguments(parser, kind)
    parser.add_argument(
        "--engine-factory",
        default=None,
        metavar="MODULE:ATTR",
        help="advanced: a zero-argument callable building the engine (tests, custom engines)",
    )


def engine_factory(args: argparse.Namespace, kind: str = "generate") -> Callable[[], Any]:
    if args.engine_factory:
        return load_callable(args.engine_factory)
    from cluster.worker import EngineFactory
    from pipeline.generate_cmd import draft_config_from_args, engine_config_from_args

    try:
        if kind == "draft":
            return EngineFactory(draft_config_from_args(args))
        return EngineFactory(engine_config_from_args(args))
    except ValueError as err:
        raise UserError(str(err)) from None


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
