"""`specdraft bench <name>`: run one benchmark and write its JSON.

Each benchmark is a module `benchmarks/<name>.py` exposing `add_arguments(parser)` and
`run(args) -> dict` (the JSON document). This module only wires them and writes `--out`, with
the document's `provenance` (`benchmarks.machine.provenance`); a benchmark's module is imported
only when its name is on the command line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline.outputs import check_writable, write_text

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "drafter": ("benchmarks.drafter", "jitted beam search vs the machine's roofline bound"),
    "llm": ("benchmarks.llm", "target LLM prefill and decode throughput"),
    "matmul": ("benchmarks.matmul", "the small-M CPU matmul kernel vs XLA's dot, per shape"),
    "decode": ("benchmarks.decode", "speculative vs plain decoding: tokens/s and acceptance"),
    "accept": ("benchmarks.accept", "the engine's tokens per LLM call on held-out prompts"),
    "cluster": ("benchmarks.cluster", "Ray workers: throughput as workers are added"),
    "draft": ("benchmarks.draft", "drafted sequences/s in process and through 1 and 2 Ray workers"),
    "llama-cpp": ("benchmarks.llama_cpp", "llama.cpp's own benchmarks on the same GGUF"),
}


def _load(module_name: str):
    """The benchmark's module, or None while it is not written yet (other errors propagate)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


class _LazyParser(argparse.ArgumentParser):
    """A benchmark's parser that imports its module and adds its flags only when it is used, so
    `specdraft bench drafter` never imports (say) Ray for the cluster benchmark."""

    def __init__(self, *args, module_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._module_name = module_name

    def _load_flags(self) -> None:
        if self._module_name is None:
            return
        module = _load(self._module_name)
        self._module_name = None
        if module is None:
            self.description = f"{self.description} (not available in this version)"
        else:
            module.add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._load_flags()
        return super().parse_known_args(args, namespace)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="benchmark", metavar="BENCHMARK", required=True, parser_class=_LazyParser
    )
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, module_name=module_name)
        p.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")


def write_json(document: dict, out: Path | None) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    write_text(out, text, "--out")
    print(f"bench: wrote {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    module = _load(BENCHMARKS[args.benchmark][0])
    if module is None:
        print(f"bench: benchmark {args.benchmark!r} is not available", file=sys.stderr)
        return 2
    if args.out is not None:
        check_writable(args.out, "--out")  # before minutes of measuring
    from benchmarks.machine import provenance

    # Every result records what made it: commit, versions, CPU, devices.
    machine = provenance()
    document = {"provenance": machine, **module.run(args)}
    write_json(document, args.out)
    return 0
