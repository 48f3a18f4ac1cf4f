"""`promptseg batch JOBS.jsonl --out DIR`: many segmentation jobs with shared prompt sets, resumable
(promptseg.engine.batch), on this machine or on a Ray cluster (--engine ray)."""

from __future__ import annotations

import argparse
import functools
import sys

from tqdm import tqdm

from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import (
    add_backend_argument,
    add_model_arguments,
    add_threshold_argument,
    backend_options,
    check_threshold,
    load_segmenter,
)
from promptseg.engine.batch import (
    LOG_NAME,
    SUMMARY_NAME,
    Options,
    local_executor,
    read_jobs,
    run_batch,
)
from promptseg.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help=COMMANDS["batch"].help,
        description="Run the jobs of JOBS.jsonl, one JSON object a line: 'query' (image, NIfTI "
        "volume, DICOM series "
        "folder or file; 'series': the SeriesInstanceUID to read from a folder of several), "
        "'prompts' "
        "([[image, mask], ...]) or 'prompt_volume' ([image, labels], 'prompt_series' as 'series'), "
        "optional 'label' "
        "(N or [N, ...]), 'out' (output name), 'truth' (a label file to score), and for volume "
        "queries 'planes' (with a 'prompt_volume') and 'slice_consistency' (true or false, as "
        "segment's flags). Relative paths "
        "are taken from "
        f"the jobs file's folder. DIR gets each job's files, {LOG_NAME} (a rerun skips the jobs "
        "done) and "
        f"{SUMMARY_NAME} (status, seconds and Dice of each job).",
    )
    parser.add_argument("jobs", metavar="JOBS.jsonl", help="the jobs file")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created when needed)"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: actors on a Ray cluster (needs the ray extra)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray actors, one model each (default: one per GPU, else 2); local runs one",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join the Ray cluster at ADDR (e.g. head-node:6379); default: start a local Ray",
    )
    parser.add_argument(
        "--axis", type=int, default=2, choices=(0, 1, 2), help="slicing axis of volumes (default 2)"
    )
    add_threshold_argument(parser)
    parser.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write probabilities (.npy or NIfTI; a FRACTIONAL DICOM-SEG for DICOM queries)",
    )
    parser.add_argument(
        "--label-names",
        nargs="+",
        default=[],
        metavar="N=NAME",
        help="segment names in DICOM-SEG outputs (default: the labels of a dataset.json "
        "beside a job's prompt label maps or query, else 'label N')",
    )
    parser.add_argument(
        "--prompt-slices",
        type=int,
        default=8,
        metavar="K",
        help="slices taken from a 'prompt_volume' as prompts, evenly among those holding the label "
        "(default 8)",
    )
    parser.add_argument(
        "--planes",
        action="store_true",
        help="segment every volume job with a 'prompt_volume' along all three axes and average "
        '(as segment --planes), unless its line sets "planes": false',
    )
    parser.add_argument(
        "--slice-consistency",
        action="store_true",
        help="make the slices of every volume job agree (as segment --slice-consistency), unless "
        'its line sets "slice_consistency": false',
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_model_arguments(parser)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="queries or slices per forward pass (default 16)",
    )
    add_backend_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_label_names(items: list[str]) -> tuple[tuple[int, str], ...]:
    """--label-names N=NAME ... -> ((N, NAME), ...); InputError naming the flag for a malformed
    item."""
    names = []
    for item in items:
        number, _, name = item.partition("=")
        if not number.isdigit() or int(number) < 1 or not name.strip():
            raise InputError(
                "--label-names", f"expected N=NAME with N a positive label value, got {item!r}"
            )
        names.append((int(number), name.strip()))
    return tuple(names)


def run(args: argparse.Namespace) -> int:
    check_threshold(args.threshold)
    if args.prompt_slices < 1:
        raise InputError("--prompt-slices", f"must be at least 1, got {args.prompt_slices}")
    if args.engine == "local" and args.workers not in (None, 1):
        raise InputError("--workers", "the local engine runs one worker; use --engine ray for more")
    if args.engine == "local" and args.address is not None:
        raise InputError("--address", "joins a Ray cluster: use it with --engine ray")
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers", f"must be at least 1, got {args.workers}")
    options = Options(
        args.threshold,
        args.axis,
        args.save_probabilities,
        parse_label_names(args.label_names),
        args.overwrite,
        args.prompt_slices,
        planes=args.planes,
        slice_consistency=args.slice_consistency,
    )
    jobs = read_jobs(args.jobs, args.out, options)
    make_segmenter = functools.partial(
        load_segmenter,
        args.checkpoint,
        args.device,
        args.max_batch,
        args.backend,
        backend_options(args.backend, args.export_dir),
    )
    if args.engine == "ray":
        from promptseg.engine.batch_ray import ray_executor

        executor = ray_executor(make_segmenter, options, args.workers, args.address)
    else:
        executor = local_executor(make_segmenter(), options)

    def progress(total: int, done: int) -> tqdm:
        return tqdm(
            total=total,
            initial=done,
            desc="batch",
            unit="job",
            file=sys.stderr,
            disable=True if args.no_progress else None,
        )

    results = run_batch(jobs, args.out, options, args.max_batch, executor, progress)
    failed = [r for r in results if r.status != "done"]
    print(
        f"batch: {len(results) - len(failed)} of {len(results)} jobs done, {len(failed)} failed; "
        f"summary in {args.out}/{SUMMARY_NAME}"
    )
    for result in failed:
        print(f"promptseg: job {result.name} failed: {result.reason}", file=sys.stderr)
    return 1 if failed else 0
