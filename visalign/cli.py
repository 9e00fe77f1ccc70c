"""The ``visalign`` command: parse, build, call the library (docs/extending.md#files-and-names: the CLI is thin).

Each sub-command lives in ``visalign/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``;
the table below maps names to those modules, so ``visalign --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "scorers": "visalign.commands.scorers",
    "sample": "visalign.commands.sample",
    "score": "visalign.commands.score",
    "train": "visalign.commands.train",
    "distill": "visalign.commands.distill",
    "convert-weights": "visalign.commands.convert_weights",
    "shapes": "visalign.commands.shapes",
    "demo": "visalign.commands.demo",
    "serve": "visalign.commands.serve",
    "export": "visalign.commands.export",
    "rm": "visalign.commands.rm",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visalign",
        description="Align image and video generators with reward signals.",
        epilog="Run 'visalign COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(COMMANDS[name]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except BrokenPipeError:  # `visalign scorers | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's final flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
