"""The subcommands of `promptseg`: name -> the module that implements it and its one-line help.

Importing this module imports nothing else, so that `promptseg --help` lists the commands without
loading torch; each command's module is imported only when that command runs (or shows its help).
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand: its module (with add_parser(subparsers) and run(args)) and its help line."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "segment": Command(
        "promptseg.cli.segment", "segment images or volumes from a few annotated prompts"
    ),
    "batch": Command(
        "promptseg.cli.batch", "run a JSONL file of segmentation jobs, resumably, locally or on Ray"
    ),
    "train": Command("promptseg.cli.train", "train a model on dataset folders and synthetic tasks"),
    "eval": Command("promptseg.cli.eval", "score the model and two baselines on held-out datasets"),
    "export": Command(
        "promptseg.cli.export", "export the model to ONNX, TensorRT engines or AOTInductor packages"
    ),
    "bench": Command(
        "promptseg.cli.bench", "time whole-volume segmentation with and without the prompt cache"
    ),
    "demo": Command(
        "promptseg.cli.demo",
        "segment a synthetic 3D phantom from a few annotated slices (no data or network needed)",
    ),
}
