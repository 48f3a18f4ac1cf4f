"""`promptseg train`: episodic training on dataset folders and synthetic tasks (torchrun for
DDP)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from promptseg.cli.commands import COMMANDS
from promptseg.data.index import build_tasks
from promptseg.data.layouts import find_datasets
from promptseg.data.packed import find_packs, is_pack, pack_dataset_name
from promptseg.errors import InputError, short_reason
from promptseg.train.config import TrainConfig
from promptseg.train.trainer import train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help=COMMANDS["train"].help,
        description="Episodic training with CE + Dice, AdamW, warm-up + cosine schedule. "
        "Run under `torchrun --nproc_per_node N` for several processes (DDP).",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="DIR",
        help="dataset folders (nnU-Net v2 or images/ + labels/), or folders of them; "
        "omit to train on synthetic tasks only",
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="NAME", help="dataset names to hold out"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run folder: checkpoints, log.jsonl, final.safetensors",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="training recipe (YAML or JSON); see configs/"
    )
    parser.add_argument(
        "--val-data",
        nargs="+",
        default=[],
        metavar="DIR",
        help="dataset folders scored every val_every steps",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in RUN_DIR"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a RUN_DIR that holds an earlier run (its checkpoints, log and "
        "weights are deleted)",
    )
    parser.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="warm-start from a weights file of the same model config (a new optimizer); "
        "its compute record carries over into the new weights",
    )
    parser.add_argument(
        "--cases",
        choices=("all", "train"),
        default="train",
        help="train on every case, or (default) leave out the fixed 20%% case split that "
        "`promptseg eval --cases held` scores fit on",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="packed dataset cache: decode each dataset once into DIR and memory-map it on "
        "later runs (repacked when the source files change); --data may also name pack folders",
    )
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        help="array axis along which 3D cases are sliced into examples, as stored (2: axial for "
        "most NIfTI datasets) (default: the config's axis, 2)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def dataset_folders(roots: list[str], exclude: list[str]) -> list[str]:
    """Expand folders of datasets (or of pack folders) and drop the excluded dataset names."""
    folders = [str(f) for root in roots for f in (find_packs(root) or find_datasets(root))]
    names = {f: pack_dataset_name(f) if is_pack(f) else os.path.basename(f) for f in folders}
    missing = set(exclude) - set(names.values())
    if missing:
        raise InputError("--exclude", f"no dataset named {', '.join(sorted(missing))} under --data")
    return [f for f in folders if names[f] not in exclude]


RUN_FILES = (
    "latest.json",
    "log.jsonl",
    "final.safetensors",
    "train_config.json",
    "step-*.json",
    "step-*.safetensors",
)


def earlier_run_files(out: str) -> list[Path]:
    """The files of an earlier run in `out` (none when the folder is new or empty of runs)."""
    folder = Path(out)
    return (
        sorted(p for pattern in RUN_FILES for p in folder.glob(pattern)) if folder.is_dir() else []
    )


def run(args: argparse.Namespace) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(args.out, "--out must be a run folder, found a file")
    earlier = earlier_run_files(args.out)
    if earlier and not (args.resume or args.overwrite):
        raise InputError(
            args.out,
            "holds an earlier run; pass --resume to continue it or --overwrite to start afresh",
        )
    if args.resume and args.overwrite:
        raise InputError("--overwrite", "cannot be combined with --resume")
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise InputError("--steps", f"must be positive, got {args.steps}")
        config = dataclasses.replace(config, steps=args.steps)
    if args.axis is not None:
        config = dataclasses.replace(config, axis=args.axis)
    resolution, channels = config.model_config().resolution, config.model_config().in_channels
    progress = not args.no_progress and int(os.environ.get("RANK", "0")) == 0
    folders = dataset_folders(args.data, args.exclude)
    tasks = (
        build_tasks(
            folders,
            resolution,
            channels,
            axis=config.axis,
            progress=progress,
            cache_dir=args.cache,
            cases=args.cases,
        )
        if folders
        else []
    )
    if not tasks:
        config = dataclasses.replace(config, synthetic_fraction=1.0)
        if progress:
            print("no real tasks given: training on synthetic tasks only")
    val_tasks = (
        build_tasks(
            dataset_folders(args.val_data, []),
            resolution,
            channels,
            axis=config.axis,
            cache_dir=args.cache,
        )
        if args.val_data
        else []
    )
    if args.init and args.resume:
        raise InputError(
            "--init", "cannot be combined with --resume (a resumed run continues its own weights)"
        )
    if args.overwrite:
        for path in earlier:
            path.unlink()
    if int(os.environ.get("RANK", "0")) == 0:  # where the run goes, with or without --no-progress
        print(
            f"training to step {config.steps} on {len(tasks)} dataset tasks (synthetic share "
            f"{config.synthetic_fraction:g}){', resumed' if args.resume else ''}; run folder: "
            f"{args.out}",
            flush=True,
        )
    try:
        result = train(
            config,
            tasks,
            args.out,
            val_tasks,
            resume=args.resume,
            device=args.device,
            progress=progress,
            init=args.init,
        )
    except (
        OSError
    ) as exc:  # the run folder cannot be written: read-only, disk full, removed meanwhile
        where = exc.filename if isinstance(exc.filename, str) else args.out
        raise InputError(
            where,
            f"training stopped, cannot write the run folder ({short_reason(exc)}); "
            "its last complete checkpoint is kept",
        ) from None
    if int(os.environ.get("RANK", "0")) == 0:  # where the run went, with or without --no-progress
        print(
            f"trained to step {result['step']} (last loss {result['loss']:.4f}); weights: "
            f"{os.path.join(args.out, 'final.safetensors')}"
        )
    return 0
