"""`promptseg export`: registered so that `--help` lists it; the exporters are the engine/export issue's work."""
from __future__ import annotations

import argparse

from promptseg.errors import PromptSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export to ONNX / TensorRT / AOTInductor (not available in this release)",
        description="Exporters (ONNX, TensorRT, AOTInductor) are not part of this release yet.",
    )
    parser.add_argument("--format", choices=["onnx", "tensorrt", "aoti"], required=True)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise PromptSegError(f"export --format {args.format}: exporters are not available in this release yet")
