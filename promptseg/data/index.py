"""The task index: dataset folders -> in-memory ArrayTasks at the model resolution (DESIGN.md section 4).

Each non-zero label value of a dataset is one task; 3D cases contribute their slices along one axis.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.io import read_image, read_label, slice_volume
from promptseg.data.layouts import Case, DatasetInfo, find_datasets, open_dataset
from promptseg.torch_threads import single_torch_thread
from promptseg.data.preprocess import normalize_intensity, resize_image, to_channels_first
from promptseg.data.tasks import ArrayTask
from promptseg.errors import InputError


def load_examples(
    dataset: DatasetInfo,
    resolution: int,
    channels: int = 3,
    axis: int = 2,
    max_empty_fraction: float = 0.1,
    max_cases: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the labelled cases of `dataset` as 2D examples at `resolution` R.

    Returns images (N, channels, R, R) uint8, labels (N, R, R) uint8 (label values) and case_ids (N,)
    (case names). A 2D case is one example; a 3D case is sliced along `axis`, keeping its slices with a
    non-empty label plus, evenly spaced, `max_empty_fraction` of its empty slices (rounded down).
    Cases without a label map are skipped; `max_cases` keeps the first cases (by name).

    Cases are read by torch.get_num_threads() worker threads while torch itself runs single-threaded
    (many small per-image operations scale badly with intra-op threads, worst on a busy machine).
    """
    cases = [case for case in dataset.cases if case.label_path is not None][:max_cases]
    workers = max(1, torch.get_num_threads())
    with single_torch_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            pool.map(lambda case: _case_examples(case, resolution, channels, axis, max_empty_fraction), cases)
        )
    images = [case_images for case_images, _ in results]
    labels = [case_labels for _, case_labels in results]
    case_ids = [np.full(len(case_labels), case.name) for case, (_, case_labels) in zip(cases, results)]
    if not images:
        return (
            np.zeros((0, channels, resolution, resolution), np.uint8),
            np.zeros((0, resolution, resolution), np.uint8),
            np.zeros(0, dtype=str),
        )
    return np.concatenate(images), np.concatenate(labels), np.concatenate(case_ids)


def _case_examples(
    case: Case, resolution: int, channels: int, axis: int, max_empty_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """One case -> images (S, channels, R, R) uint8 and labels (S, R, R) uint8."""
    label = read_label(case.label_path)  # type: ignore[arg-type]
    # Three channel files feed an RGB-style model directly; otherwise channel 0 (replicated as needed).
    paths = case.image_paths if len(case.image_paths) == 3 and channels == 3 else case.image_paths[:1]
    image_data = [read_image(path) for path in paths]
    for data in image_data:
        if data.array.shape[: label.array.ndim] != label.array.shape or data.is_volume != label.is_volume:
            raise InputError(
                case.label_path, f"label shape {label.array.shape} does not match image shape {data.array.shape}"
            )
    if int(label.array.max()) > 255:
        raise InputError(case.label_path, f"label values above 255 are not supported (found {label.array.max()})")
    if label.is_volume:
        label_slices = slice_volume(label.array, axis)
        keep = _slices_to_keep(label_slices, max_empty_fraction)
        planes = np.stack([slice_volume(data.array, axis)[keep] for data in image_data], axis=1)
        label_slices = label_slices[keep]
    else:
        planes = np.stack([data.array for data in image_data])[None] if len(paths) > 1 else image_data[0].array[None]
        label_slices = label.array[None]
    return _prepare_images(planes, resolution, channels, paths[0]), _resize_labels(label_slices, resolution)


def _slices_to_keep(label_slices: np.ndarray, max_empty_fraction: float) -> np.ndarray:
    """Indices (sorted) of the non-empty slices of (S, H, W) plus evenly spaced empty ones."""
    filled = label_slices.reshape(len(label_slices), -1).any(axis=1)
    empty = np.flatnonzero(~filled)
    count = int(max_empty_fraction * len(empty))
    chosen = empty[np.unique(np.linspace(0, len(empty) - 1, count).round().astype(int))] if count else empty[:0]
    return np.sort(np.concatenate([np.flatnonzero(filled), chosen]))


def _prepare_images(planes: np.ndarray, resolution: int, channels: int, source: str) -> np.ndarray:
    """(S, k, H, W) or (S, H, W, k) raw planes -> (S, channels, R, R) uint8, normalised per slice."""
    prepared = np.stack(
        [normalize_intensity(to_channels_first(plane, channels, source), source) for plane in planes]
    )
    resized = resize_image(torch.from_numpy(prepared), resolution)
    return (resized * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _resize_labels(label_slices: np.ndarray, resolution: int) -> np.ndarray:
    """(S, H, W) integer label maps -> (S, R, R) uint8 by nearest-neighbour resampling."""
    maps = torch.from_numpy(label_slices.astype(np.float32))[:, None]
    if tuple(maps.shape[-2:]) != (resolution, resolution):
        maps = F.interpolate(maps, size=(resolution, resolution), mode="nearest-exact")
    return maps[:, 0].to(torch.uint8).numpy()


def build_tasks(
    roots: Sequence[str | os.PathLike],
    resolution: int,
    channels: int = 3,
    axis: int = 2,
    min_examples: int = 2,
    progress: bool = False,
    max_cases: int | None = None,
) -> list[ArrayTask]:
    """One ArrayTask per (dataset, non-zero label value) with at least `min_examples` non-empty masks.

    Each root is a dataset folder or a folder of dataset folders. Task names are "<dataset>/<label
    name>" (label names from dataset.json, else "label_<value>"), the group is the dataset name; the
    tasks of one dataset share its (N, channels, R, R) uint8 image array and case_ids, with masks
    (N, R, R) bool = labels == value. `progress` prints one line per dataset to stderr.
    """
    tasks: list[ArrayTask] = []
    for root in [folder for given in roots for folder in find_datasets(Path(given))]:
        start = time.perf_counter()
        dataset = open_dataset(root)
        images, labels, case_ids = load_examples(dataset, resolution, channels, axis, max_cases=max_cases)
        added = 0
        for value in np.unique(labels):
            if value == 0:
                continue
            masks = labels == value
            if int(masks.reshape(len(masks), -1).any(axis=1).sum()) < min_examples:
                continue
            name = dataset.labels.get(int(value), f"label_{int(value)}")
            tasks.append(ArrayTask(f"{dataset.name}/{name}", dataset.name, images, masks, case_ids))
            added += 1
        if progress:
            print(
                f"{dataset.name}: {len(images)} examples, {added} tasks ({time.perf_counter() - start:.1f}s)",
                file=sys.stderr,
            )
    return tasks
