"""Engine flags of `generate` and `draft`, turned into a picklable engine factory.

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
    engine.add_argument(
        "--engine-factory",
        default=None,
        metavar="MODULE:ATTR",
        help="advanced: a zero-argument callable building the engine (tests, custom engines)",
    )


def engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    if args.engine_factory:
        return load_callable(args.engine_factory)
    raise UserError("the real engine is not available yet; pass --engine-factory")


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
