"""Command-line interface: `promptseg segment | batch | train | eval | export | bench | demo` (DESIGN.md section 5).

Failures a user can fix (PromptSegError and its subclasses, and bad arguments) print one line
`promptseg: error: <reason>` to stderr and exit with 2; Ctrl-C exits with 130. Any other exception
is a bug and propagates with its traceback. Warnings print as one line `promptseg: warning: ...`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn, Sequence, TextIO

from promptseg import __version__
from promptseg.cli import batch, bench, demo, export, segment, train
from promptseg.cli import eval as eval_command
from promptseg.errors import PromptSegError

SUBCOMMANDS = (segment, batch, train, eval_command, export, bench, demo)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the --help to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"promptseg: error: {_one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The `promptseg` parser with every subcommand registered (each sets `func(args) -> int`)."""
    parser = OneLineParser(
        prog="promptseg",
        description="Universal medical image segmentation by visual prompts: give a few images with masks "
        "(or clicks, boxes, scribbles) of a structure and segment it in new images or volumes.",
    )
    parser.add_argument("--version", action="version", version=f"promptseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    print(f"promptseg: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 success, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error already printed
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except PromptSegError as error:
            print(f"promptseg: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("promptseg: interrupted", file=sys.stderr)
            return 130
