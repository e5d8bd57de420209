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


# Errors raised by lower layers whose message already says what is wrong and how to fix it
# (file, tensor, line); the CLI prints them like UserError instead of a traceback.
USER_ERRORS = {
    "pipeline.models": "ModelNotFoundError",
    "pipeline.gguf_file": "ModelFileError",
    "pipeline.checkpoint": "CheckpointError",
    "pipeline.drafter_io": "DrafterCheckpointError",
    "pipeline.prompts": "PromptFileError",
    "pipeline.outputs": "OutputPathError",
}


def _user_errors() -> tuple[type[Exception], ...]:
    """The classes of USER_ERRORS whose modules the command has already imported."""
    found = [UserError]
    for module, name in USER_ERRORS.items():
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


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
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"specdraft {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"specdraft {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
