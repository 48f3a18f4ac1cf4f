"""`promptseg export`: placeholder until the lead's exporter lands (it replaces this file)."""
from __future__ import annotations

import argparse

from promptseg.errors import PromptSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the model (not implemented yet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise PromptSegError("not implemented yet")
