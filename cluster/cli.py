"""The `specdraft` command line (also `python -m pipeline` / `python -m cluster`).

Each subcommand lives in the module that owns the work; this file only wires them. A command
module exposes `add_arguments(parser)` and `run(args) -> int | None`. Modules are imported only
when their subcommand runs, so `specdraft --help` stays fast and does not initialise JAX or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("cluster.commands.generate", "speculative decoding over a prompt file"),
    "draft": ("cluster.commands.draft", "drafted beams only (no verification)"),
    "train": ("pipeline.train_cmd", "train a drafter by self-distillation"),
    "bench": ("benchmarks.cli", "run a benchmark and write JSON"),
    "info": ("cluster.commands.info", "devices, mesh, model, drafter checkpoint, Ray cluster"),
    "fetch-model": ("pipeline.models", "download the default target model into the cache"),
}


class UserError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def build_parser(modules: dict[str, object]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdraft",
        description="Speculative decoding with a recurrent drafter (ReDrafter) in JAX, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = modules.get(name)
        if module is not None:
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen subcommand's module (the first non-flag argument).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    if chosen in COMMANDS:
        modules[chosen] = importlib.import_module(COMMANDS[chosen][0])
    args = build_parser(modules).parse_args(argv)
    try:
        status = modules[args.command].run(args)
    except UserError as err:
        print(f"specdraft {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"specdraft {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
