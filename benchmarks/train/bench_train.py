"""Training throughput: episodes/s and images/s of a training recipe, data path and model step timed
apart.

Run from the repository root:

    python -m benchmarks.train.bench_train                 # the recipe as configured (the new path)
    python -m benchmarks.train.bench_train --compare       # today's path and the new one in one run

Two paths, same recipe, same seed and so the same K at every step:
- "previous": the training path before issue 12: every dataset decoded from its PNG / JPEG / NIfTI
  files at start-up, full float32, episodes built in the training process, uniform task draws;
- "current": the recipe's own settings: packed dataset cache (memory-mapped uint8, decoded once;
  the pack is built before timing and its build time reported apart), bf16 autocast where the
  device computes bf16 natively (label propagation and CPU attention in float32), `loader_workers`
  worker processes, hardness-weighted task draws.
For each path: start-up (task building), data (mean seconds to build one step's batch), model
(mean seconds of one optimisation step on a ready batch) and end-to-end steps through the real
training loop (batches from `step_batches`, as `Trainer.run` draws them). Episodes/s and images/s
(prompts + queries) are end-to-end. With --compare the run ends with `speed-up: N.Nx` (end-to-end
episodes/s, current over previous). Results go to benchmarks/results/train-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from promptseg.cli.train import dataset_folders
from promptseg.data.index import build_tasks
from promptseg.train.config import TrainConfig
from promptseg.train.distributed import init_distributed
from promptseg.train.prefetch import StepBatches, step_batches
from promptseg.train.trainer import Trainer

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
REPO = Path(__file__).resolve().parents[2]


def previous_path(config: TrainConfig) -> TrainConfig:
    """The recipe as the pre-issue-12 trainer ran it."""
    return dataclasses.replace(config, mixed_precision=False, loader_workers=0, hardness_mix=0.0)


def bench_path(
    name: str, config: TrainConfig, folders: list[str], cache: str | None, args: argparse.Namespace
) -> dict:
    """Time one path; returns its row of figures."""
    start = time.perf_counter()
    tasks = build_tasks(
        folders,
        config.model_config().resolution,
        axis=config.axis,
        cache_dir=cache,
        cases=args.cases,
    )
    startup = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, tasks, out, context=init_distributed(args.device), progress=False)
        batches = StepBatches(trainer.sampler, config.episodes_per_step)
        data, model, images = [], [], 0
        for step in range(args.warmup + args.steps):  # data and model step timed apart, in-process
            t0 = time.perf_counter()
            batch = batches[step]
            t1 = time.perf_counter()
            trainer.train_step(step, batch)
            synchronize(trainer.context.device)
            t2 = time.perf_counter()
            if step >= args.warmup:
                data.append(t1 - t0)
                model.append(t2 - t1)
        first = args.warmup + args.steps
        iterator = step_batches(
            batches, first, first + args.warmup + args.steps, config.loader_workers
        )
        for step in range(first, first + args.warmup):  # end to end, as Trainer.run draws batches
            trainer.train_step(step, next(iterator))
        synchronize(trainer.context.device)
        t0 = time.perf_counter()
        for step in range(first + args.warmup, first + args.warmup + args.steps):
            batch = next(iterator)
            images += batch.prompt_images.shape[0] * (
                batch.prompt_images.shape[1] + batch.query_images.shape[1]
            )
            trainer.train_step(step, batch)
        synchronize(trainer.context.device)
        elapsed = time.perf_counter() - t0
    episodes = args.steps * config.episodes_per_step
    return {
        "path": name,
        "startup_s": startup,
        "data_s_per_step": float(np.mean(data)),
        "model_s_per_step": float(np.mean(model)),
        "end_to_end_s_per_step": elapsed / args.steps,
        "episodes_per_s": episodes / elapsed,
        "images_per_s": images / elapsed,
        "mixed_precision": config.mixed_precision,
        "loader_workers": config.loader_workers,
        "packed_cache": cache is not None,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        (
            f"Training throughput: {header['recipe']}, {header['steps']} timed steps after "
            f"{header['warmup']} warm-up "
            f"steps, {header['device']}, torch {header['torch']}, {header['date']}."
        ),
        "",
        f"Command: `{header['command']}`",
        "",
        "| path | start-up s | data s/step | model s/step | end-to-end s/step | episodes/s | "
        "images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['startup_s']:.1f} | {row['data_s_per_step']:.3f} | "
            f"{row['model_s_per_step']:.3f} | "
            f"{row['end_to_end_s_per_step']:.3f} | {row['episodes_per_s']:.2f} | "
            f"{row['images_per_s']:.1f} |"
        )
    if "speed_up" in header:
        lines += ["", f"speed-up: {header['speed_up']:.1f}x"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default=str(REPO / "configs" / "release_cpu.yaml"), help="training recipe"
    )
    parser.add_argument(
        "--data", nargs="+", default=[str(REPO.parent / "shared" / "data")], metavar="DIR"
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="packed cache for the current path (default: a temporary one)",
    )
    parser.add_argument("--cases", default="train", choices=("all", "train"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the previous training path and print the speed-up",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--out", type=Path, help="JSON output (default benchmarks/results/train-<device>.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.load(args.config)
    folders = dataset_folders(args.data, [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or str(Path(scratch) / "packed")
        start = time.perf_counter()
        build_tasks(folders, config.model_config().resolution, axis=config.axis, cache_dir=cache)
        pack_seconds = time.perf_counter() - start
        rows = []
        if args.compare:
            rows.append(bench_path("previous", previous_path(config), folders, None, args))
        rows.append(bench_path("current", config, folders, cache, args))
    label = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    header = {
        "recipe": Path(args.config).name,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": label,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "pack_build_s": pack_seconds,
        "command": (
            "python -m benchmarks.train.bench_train"
            + (" --compare" if args.compare else "")
            + ("" if args.steps == 40 else f" --steps {args.steps}")
        ),
    }
    if args.compare:
        header["speed_up"] = rows[1]["episodes_per_s"] / rows[0]["episodes_per_s"]
    slug = "cuda" if device.type == "cuda" else f"cpu-{torch.get_num_threads()}-threads"
    out = args.out or RESULTS_DIR / f"train-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, header)
    out.with_suffix(".md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
