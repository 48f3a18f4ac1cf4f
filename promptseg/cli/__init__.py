"""Command-line interface: `promptseg segment | batch | train | eval | export | bench | demo` (docs/design.md section 5.6).

Failures a user can fix (PromptSegError and its subclasses, bad arguments, and running out of
memory) print one line `promptseg: error: <reason>` to stderr and exit with 2; Ctrl-C exits with
130, SIGTERM and SIGHUP with 143 and 129 after the same clean-up as Ctrl-C (no partial output is
left). Any other exception is a bug and propagates with its traceback. Warnings print as one line
`promptseg: warning: ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn, TextIO

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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is (like Ctrl-C), so the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated (in the main thread only: elsewhere
    signal handlers cannot be set, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 success, 2 bad input or out of memory, 130
    interrupted, 128 + N for signal N among SIGTERM and SIGHUP)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error already printed
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    with warnings.catch_warnings(), terminate_like_interrupt():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except PromptSegError as error:
            print(f"promptseg: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except MemoryError:
            print(f"promptseg: error: {args.command}: out of memory; use smaller or fewer inputs", file=sys.stderr)
            return 2
        except Terminated as stop:
            print(f"promptseg: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print("promptseg: interrupted", file=sys.stderr)
            return 130
