"""`specdraft bench <name>`: run one benchmark and write its JSON.

Each benchmark is a module `benchmarks/<name>.py` exposing `add_arguments(parser)` and
`run(args) -> dict` (the JSON document). This module only wires them and writes `--out`.
Benchmark modules import JAX and their subjects inside `run`, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "drafter": ("benchmarks.drafter", "jitted beam search vs the machine's roofline bound"),
    "llm": ("benchmarks.llm", "target LLM prefill and decode throughput"),
    "decode": ("benchmarks.decode", "speculative vs plain decoding: tokens/s and acceptance"),
    "cluster": ("benchmarks.cluster", "Ray workers: throughput as workers are added"),
}


def _load(module_name: str):
    """The benchmark's module, or None while it is not written yet (other errors propagate)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = _load(module_name)
        if module is None:
            help_text += " (not available in this version)"
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")
        if module is not None:
            module.add_arguments(p)


def write_json(document: dict, out: Path | None) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"bench: wrote {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    module = _load(BENCHMARKS[args.benchmark][0])
    if module is None:
        print(f"bench: benchmark {args.benchmark!r} is not available", file=sys.stderr)
        return 2
    document = module.run(args)
    write_json(document, args.out)
    return 0
