"""`promptseg bench`: whole-volume time with and without the prompt cache."""

from __future__ import annotations

import argparse
import json

import torch

from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import add_backend_argument, backend_options, load_segmenter
from promptseg.engine.benchmark import time_volume
from promptseg.errors import InputError
from promptseg.files import refuse_existing, write_text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help=COMMANDS["bench"].help,
        description="Segments a random volume at the model resolution; reports the best of "
        "--repeats runs.",
    )
    parser.add_argument(
        "--slices", type=int, default=64, metavar="N", help="depth of the random volume"
    )
    parser.add_argument(
        "--shots",
        nargs="+",
        type=int,
        default=[1, 8],
        metavar="K",
        help="numbers of prompts K to time, one row each",
    )
    parser.add_argument(
        "--max-batch", type=int, default=16, metavar="N", help="slices per forward pass"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="runs per row; the fastest is reported"
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", help="weights (default: the packaged weights)"
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)"
    )
    add_backend_argument(parser)
    parser.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.slices < 1 or args.repeats < 1:
        raise InputError("--slices/--repeats", "must be positive")
    if args.out:
        refuse_existing([args.out], args.overwrite)
    seg = load_segmenter(
        args.checkpoint,
        args.device,
        args.max_batch,
        args.backend,
        backend_options(args.backend, args.export_dir),
    )
    limit = seg.model.config.max_prompts
    for shots in args.shots:
        if not 1 <= shots <= limit:
            raise InputError(
                "--shots", f"must lie in 1..{limit} (the model's prompt limit), got {shots}"
            )
    rows = []
    print(
        "| device | slices | K | batch | cached s | re-encoded s | speed-up "
        "|\n|---|---|---|---|---|---|---|"
    )
    for shots in args.shots:
        timing = time_volume(seg, args.slices, seg.resolution, shots, repeats=args.repeats)
        rows.append(timing.as_dict())
        print(
            f"| {timing.device} | {timing.slices} | {shots} | {timing.batch} | "
            f"{timing.cached_s:.3f} | "
            f"{timing.reencoded_s:.3f} | {timing.speedup:.2f}x |"
        )
    if args.out:
        write_text(
            args.out,
            json.dumps({"torch": torch.__version__, "results": rows}, indent=2),
            overwrite=args.overwrite,
        )
    return 0
