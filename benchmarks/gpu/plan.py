"""What a GPU session runs, and its dry run's stand-ins on the CPU.

The GPU plan: the CUDA branch of the test suite, the kernel benchmark's quick grid, the engine
benchmark on every CUDA backend (256-slice volumes at K = 8), the release recipe trained from the
shipped weights with the four held-out datasets excluded, and `promptseg eval` on those four.
The dry plan runs the same commands on the CPU with tiny shapes: a CPU-runnable subset of those
tests, the tiny config on generated packs, a few steps from random tiny weights, a short eval.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.gpu.runner import REPO
from benchmarks.kernels import bench_attention
from promptseg.data.packed import FORMAT, write_pack
from promptseg.model import PromptSegNet
from promptseg.model.weights import packaged_weights_path, save_weights
from promptseg.train.config import TrainConfig

RECIPE = REPO / "configs" / "corrections_cpu.yaml"  # continues the shipped weights
TINY_RECIPE = REPO / "configs" / "tiny_test.yaml"
HELD_OUT = (
    "la_mri",
    "isbi_em",
    "ph2",
    "hc18",
)  # held out by the release recipe (configs/release_cpu.yaml)
# Test files with CUDA-only parts, those that need the GPU most first (a stopped run keeps what
# ran).
GPU_TESTS = (
    "tests/test_triton_attention.py",
    "tests/test_cuda_backends.py",
    "tests/test_tensorrt.py",
    "tests/test_engine.py",
    "tests/test_export_onnx.py",
)
DRY_TESTS = (
    "tests/test_triton_attention.py::test_rejects_unsupported_inputs",
    "tests/test_engine.py::test_unknown_and_unavailable_backends_say_why",
    "tests/test_export_onnx.py::test_availability_gives_one_line_reasons",
    "tests/test_tensorrt.py::test_availability_reason_is_one_line",
)
VOLUME_256 = ["--slices", "256", "--volume-shots", "8"]
# Eager backends: K 1/4/8/16 at 128 and 256 px, batch 1 to 256, volumes at batch 1/16/64. Backends
# that
# compile or build per shape: the K = 8, 256 px rows at batch 1 and 64, and the volume at batch 64.
EAGER = [*VOLUME_256, "--batches", "1", "4", "16", "64", "256", "--repeats", "5"]
ONE_SHAPE = [
    *VOLUME_256,
    "--resolutions",
    "256",
    "--shots",
    "8",
    "--batches",
    "1",
    "64",
    "--volume-batches",
    "64",
]
GPU_ENGINE = {
    "triton": EAGER,
    "torch": EAGER,
    "compile": ONE_SHAPE,
    "onnxruntime": ONE_SHAPE,
    "tensorrt": ONE_SHAPE,
}
DRY_ENGINE = {
    "torch": [
        "--resolutions",
        "32",
        "--shots",
        "1",
        "--batches",
        "1",
        "2",
        "--slices",
        "4",
        "--volume-shots",
        "1",
        "--volume-batches",
        "2",
        "--repeats",
        "1",
        "--volume-repeats",
        "1",
    ]
}
GPU_CHECKPOINT_EVERY = 100
DRY_STEPS, DRY_CHECKPOINT_EVERY, DRY_STOP_AFTER = (
    1000,
    2,
    2,
)  # the dry run is stopped like a GPU run out of time
DRY_PACKS = {"dry_train_a": 12, "dry_train_b": 12, "dry_held": 8}  # dataset name: examples


@dataclass
class Plan:
    """One session's commands: device, tests, benchmark flags, training recipe and eval protocol."""

    dry_run: bool
    device: str
    tests: tuple[str, ...]
    kernel_runs: list[list[str]]  # bench_attention flags of each process, in the order they run
    engine: dict[str, list[str]]  # backend: bench_engine flags, in the order they run
    train_config: dict[
        str, Any
    ]  # the recipe with this machine's loader workers and checkpoint interval
    init: Path
    packs: Path
    held_out: tuple[str, ...]
    train_steps: int | None  # --steps of promptseg train (None: the recipe's)
    stop_after_step: int | None  # stop training once this checkpoint exists (the dry run)
    eval_shots: tuple[int, ...]
    eval_episodes: int


def recipe(path: Path, **overrides: Any) -> dict[str, Any]:
    """The training config at `path` with `overrides`, checked by TrainConfig."""
    config = {**yaml.safe_load(path.read_text()), **overrides}
    TrainConfig.from_dict(config, str(path))
    return config


def quick_kernel_runs() -> list[list[str]]:
    """bench_attention's --before-after run, then its --quick grid as one process per K, the
    largest K first (shared and ragged prompt keys matter most), so that a run stopped by the
    budget keeps the K that finished."""
    quick = bench_attention.parse_args(["--quick"])
    common = [
        "--nq",
        *map(str, quick.nq),
        "--dims",
        *map(str, quick.dims),
        "--dtypes",
        *quick.dtypes,
        "--ratios",
        *map(str, quick.ratios),
    ]
    quick_runs = [[*common, "--prompts", str(k)] for k in sorted(quick.prompts, reverse=True)]
    # First, the before/after of issue 16 items 12-14 (fixed tiles, so no autotuning time).
    return [["--before-after"], *quick_runs]


def gpu_plan(packs: Path, train_steps: int | None) -> Plan:
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    return Plan(
        False,
        "cuda",
        GPU_TESTS,
        quick_kernel_runs(),
        GPU_ENGINE,
        recipe(RECIPE, loader_workers=workers, checkpoint_every=GPU_CHECKPOINT_EVERY),
        packaged_weights_path(),
        packs,
        HELD_OUT,
        train_steps,
        None,
        (1, 2, 4, 8, 16),
        10,
    )


def dry_plan(scratch: Path) -> Plan:
    """The dry run's plan, with its generated packs and random tiny initial weights in `scratch`."""
    config = recipe(
        TINY_RECIPE,
        steps=DRY_STEPS,
        checkpoint_every=DRY_CHECKPOINT_EVERY,
        loader_workers=1,
        synthetic_fraction=0.5,
    )
    train_config = TrainConfig.from_dict(config)
    init = scratch / "init.safetensors"
    torch.manual_seed(0)
    save_weights(PromptSegNet(train_config.model_config()), init)
    packs = scratch / "packs"
    model_config = train_config.model_config()
    write_disk_packs(packs, model_config.resolution, model_config.in_channels, train_config.axis)
    return Plan(
        True,
        "cpu",
        DRY_TESTS,
        quick_kernel_runs(),
        DRY_ENGINE,
        config,
        init,
        packs,
        ("dry_held",),
        None,
        DRY_STOP_AFTER,
        (1, 2),
        2,
    )


def write_disk_packs(folder: Path, resolution: int, channels: int, axis: int) -> None:
    """Pack folders of DRY_PACKS: grey noisy images with a bright disk (label 1) and a dark square
    (label 2)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[:resolution, :resolution]
    for name, count in DRY_PACKS.items():
        labels = np.zeros((count, resolution, resolution), np.uint8)
        for label_map in labels:
            cy, cx = rng.uniform(0.3, 0.7, 2) * resolution
            label_map[(ys - cy) ** 2 + (xs - cx) ** 2 <= (0.2 * resolution) ** 2] = 1
            y, x = rng.integers(0, resolution // 2, 2)
            label_map[y : y + resolution // 4, x : x + resolution // 4] = 2
        images = np.clip(
            90 + 100 * (labels == 1) - 60 * (labels == 2) + rng.normal(0, 15, labels.shape), 0, 255
        )
        meta = {
            "format": FORMAT,
            "name": name,
            "labels": {"1": "disk", "2": "square"},
            "resolution": resolution,
            "axis": axis,
            "channels": channels,
            "signature": [],
        }
        write_pack(
            folder / f"{name}-r{resolution}-a{axis}-c{channels}",
            meta,
            images.astype(np.uint8)[:, None],
            labels,
            np.array([f"case{i}" for i in range(count)]),
        )
