"""Command-line interface: `promptseg segment | batch | train | eval | export | bench | demo`
(docs/design.md section 5.6).

Failures a user can fix (PromptSegError and its subclasses, bad arguments, and running out of
memory) print one line `promptseg: error: <reason>` to stderr and exit with 2; Ctrl-C exits with
130, SIGTERM and SIGHUP with 143 and 129 after the same clean-up as Ctrl-C (no partial output is
left). Any other exception is a bug and propagates with its traceback. Warnings print as one line
`promptseg: warning: ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from promptseg.cli.commands import COMMANDS
from promptseg.errors import PromptSegError, is_out_of_memory
from promptseg.version import __version__


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class DefaultsShownFormatter(argparse.HelpFormatter):
    """Help text ending in "(default: X)" for every option with a default, unless its text already
    says what the default is (options without one, None, or off flags, say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the --help to read, and whose
    help shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShownFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"promptseg: error: {_one_line(message)} (see '{self.prog} --help')\n")


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `promptseg` parser (each subcommand sets `func(args) -> int`).

    load: the subcommands whose modules are imported and whose options are registered (None: all);
    the others are listed with their help line only, so `promptseg --help` imports no command.
    """
    parser = OneLineParser(
        prog="promptseg",
        description="Universal medical image segmentation by visual prompts: give a few images "
        "with masks "
        "(or clicks, boxes, scribbles) of a structure and segment it in new images or volumes.",
    )
    parser.add_argument("--version", action="version", version=f"promptseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        if load is None or name in load:
            importlib.import_module(command.module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=command.help)
    return parser


def command_named(argv: Sequence[str]) -> str | None:
    """The subcommand that `argv` runs: its first argument that is not an option (None when
    none)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(
            load=[command_named(argv)] if command_named(argv) in COMMANDS else []
        ).parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage error already printed
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    with warnings.catch_warnings(), terminate_like_interrupt():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except PromptSegError as error:
            print(f"promptseg: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):  # torch's allocator raises RuntimeError
                raise
            print(
                f"promptseg: error: {args.command}: out of memory; use smaller or fewer inputs",
                file=sys.stderr,
            )
            return 2
        except Terminated as stop:
            print(f"promptseg: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print("promptseg: interrupted", file=sys.stderr)
            return 130
