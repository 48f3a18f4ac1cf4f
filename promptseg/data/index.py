"""The task index: dataset folders -> in-memory ArrayTasks at the model resolution (docs/design.md
section 4).

Each non-zero label value of a dataset is one task; 3D cases contribute their slices along one axis
of their closest RAS orientation (as the engine slices volumes).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.io import ImageData, canonical_view, read_image, read_label, slice_volume
from promptseg.data.layouts import Case, DatasetInfo, find_datasets, open_dataset
from promptseg.data.packed import PackedExamples, cached_examples, find_packs, read_pack
from promptseg.data.preprocess import normalize_intensity, resize_image, to_channels_first
from promptseg.data.tasks import ArrayTask
from promptseg.errors import InputError
from promptseg.torch_threads import single_torch_thread

HELD_CASE_FRACTION = 0.2  # share of each dataset's cases kept out of training to measure fit
CASE_SETS = ("all", "train", "held", "held-queries")


def load_examples(
    dataset: DatasetInfo,
    resolution: int,
    channels: int = 3,
    axis: int = 2,
    max_empty_fraction: float = 0.1,
    max_cases: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the labelled cases of `dataset` as 2D examples at `resolution` R.

    Returns images (N, channels, R, R) uint8, labels (N, R, R) uint8 (label values) and case_ids
    (N,) (case names). A 2D case is one example; a 3D case is sliced along `axis`, keeping its
    slices with a non-empty label plus, evenly spaced, `max_empty_fraction` of its empty slices
    (rounded down). Cases without a label map are skipped; `max_cases` keeps the first cases (by
    name).

    Cases are read by torch.get_num_threads() worker threads while torch itself runs single-threaded
    (many small per-image operations scale badly with intra-op threads, worst on a busy machine).
    """
    cases = [case for case in dataset.cases if case.label_path is not None][:max_cases]
    workers = max(1, torch.get_num_threads())
    with single_torch_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            pool.map(
                lambda case: _case_examples(case, resolution, channels, axis, max_empty_fraction),
                cases,
            )
        )
    images = [case_images for case_images, _ in results]
    labels = [case_labels for _, case_labels in results]
    case_ids = [
        np.full(len(case_labels), case.name) for case, (_, case_labels) in zip(cases, results)
    ]
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
    # Three channel files feed an RGB-style model directly; otherwise channel 0 (replicated as
    # needed).
    paths = (
        case.image_paths if len(case.image_paths) == 3 and channels == 3 else case.image_paths[:1]
    )
    image_data = [read_image(path) for path in paths]
    for data in image_data:
        if (
            data.array.shape[: label.array.ndim] != label.array.shape
            or data.is_volume != label.is_volume
        ):
            raise InputError(
                case.label_path,
                f"label shape {label.array.shape} does not match image shape {data.array.shape}",
            )
    if int(label.array.max()) > 255:
        raise InputError(
            case.label_path, f"label values above 255 are not supported (found {label.array.max()})"
        )
    if label.is_volume:
        volumes, label_volume = oriented_case(image_data, label)
        label_slices = slice_volume(label_volume, axis)
        keep = _slices_to_keep(label_slices, max_empty_fraction)
        planes = np.stack([slice_volume(volume, axis)[keep] for volume in volumes], axis=1)
        label_slices = label_slices[keep]
    else:
        planes = (
            np.stack([data.array for data in image_data])[None]
            if len(paths) > 1
            else image_data[0].array[None]
        )
        label_slices = label.array[None]
    return _prepare_images(planes, resolution, channels, paths[0]), _resize_labels(
        label_slices, resolution
    )


def oriented_case(
    image_data: Sequence[ImageData], label: ImageData
) -> tuple[list[np.ndarray], np.ndarray]:
    """A 3D case's image volumes and label volume as (X, Y, Z) views in their closest RAS
    orientation (io.canonical_view, each through its own affine, a label without one through the
    first image's), as the engine cuts queries and prompt volumes: `axis` means the same RAS axis
    in training, evaluation and inference. InputError naming the label file when the oriented
    shapes differ."""
    label_affine = label.affine if label.affine is not None else image_data[0].affine
    label_volume = canonical_view(label.array, label_affine)
    volumes = [
        canonical_view(data.array, data.affine if data.affine is not None else label_affine)
        for data in image_data
    ]
    for data, volume in zip(image_data, volumes):
        if volume.shape[:3] != label_volume.shape:
            raise InputError(
                label.path,
                f"label volume in RAS orientation {label_volume.shape} does not match the image "
                f"{data.path} in RAS orientation {volume.shape[:3]} (their affines disagree)",
            )
    return volumes, label_volume


def _slices_to_keep(label_slices: np.ndarray, max_empty_fraction: float) -> np.ndarray:
    """Indices (sorted) of the non-empty slices of (S, H, W) plus evenly spaced empty ones."""
    filled = label_slices.reshape(len(label_slices), -1).any(axis=1)
    empty = np.flatnonzero(~filled)
    count = int(max_empty_fraction * len(empty))
    chosen = (
        empty[np.unique(np.linspace(0, len(empty) - 1, count).round().astype(int))]
        if count
        else empty[:0]
    )
    return np.sort(np.concatenate([np.flatnonzero(filled), chosen]))


def _prepare_images(planes: np.ndarray, resolution: int, channels: int, source: str) -> np.ndarray:
    """(S, k, H, W) or (S, H, W, k) raw planes -> (S, channels, R, R) uint8, normalised per
    slice."""
    prepared = np.stack(
        [
            normalize_intensity(to_channels_first(plane, channels, source), source)
            for plane in planes
        ]
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
    cache_dir: str | os.PathLike | None = None,
    cases: str = "all",
    held_fraction: float = HELD_CASE_FRACTION,
) -> list[ArrayTask]:
    """One ArrayTask per (dataset, non-zero label value) with at least `min_examples` non-empty
    masks.

    Each root is a dataset folder or a folder of dataset folders, or a pack folder or a folder of
    them (promptseg.data.packed; used as they are, without their source). Task names are
    "<dataset>/<label name>" (label names from dataset.json, else "label_<value>"), the group is the
    dataset name; the tasks of one dataset share its (N, c, R, R) uint8 image array (c = channels,
    or 1 for grey data read from a pack) and case_ids, with masks (N, R, R) bool = labels == value.
    With `cache_dir`, dataset folders are decoded once into pack folders there and memory-mapped
    afterwards. `cases` keeps "all" cases, only the "train" cases or only the "held" cases of the
    fixed case split (`held_cases`, `held_fraction` of each dataset's cases), so that fit can be
    measured on cases a run never trained on; "held-queries" keeps all cases and marks the held ones
    as the only queries (ArrayTask.query_examples), so that they are prompted from training cases.
    `progress` prints one line per dataset to stderr.
    """
    if cases not in CASE_SETS:
        raise ValueError(f"cases must be one of {', '.join(CASE_SETS)}, got {cases!r}")
    tasks: list[ArrayTask] = []
    for given in roots:
        packs = find_packs(given)
        sources = packs or find_datasets(Path(given))
        for root in sources:
            start = time.perf_counter()
            examples = (
                _pack_examples(root, resolution)
                if packs
                else _dataset_examples(root, resolution, channels, axis, max_cases, cache_dir)
            )
            queries = (
                held_cases(examples.name, examples.case_ids, held_fraction)
                if cases == "held-queries"
                else None
            )
            if cases in ("train", "held"):
                examples = _select_cases(examples, cases, held_fraction)
            added = _add_tasks(tasks, examples, min_examples, queries)
            if progress:
                print(
                    f"{examples.name}: {len(examples.images)} examples, {added} tasks "
                    f"({time.perf_counter() - start:.1f}s)",
                    file=sys.stderr,
                )
    return tasks


def held_cases(dataset: str, case_ids: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool: the examples whose case is in the held-out part of the fixed case split.

    A case is held out when the SHA-1 of "<dataset>/<case>", read as a number in [0, 1), is below
    `fraction`: stable across runs, machines, dataset order and added cases.
    """
    names = np.unique(case_ids)
    held = {name for name in names if _unit_hash(f"{dataset}/{name}") < fraction}
    return np.array([name in held for name in case_ids], dtype=bool)


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2.0**64


def _select_cases(examples: PackedExamples, cases: str, fraction: float) -> PackedExamples:
    held = held_cases(examples.name, examples.case_ids, fraction)
    keep = held if cases == "held" else ~held
    return PackedExamples(
        examples.name,
        examples.labels,
        np.asarray(examples.images[keep]),
        np.asarray(examples.label_maps[keep]),
        examples.case_ids[keep],
    )


def _pack_examples(folder: Path, resolution: int) -> PackedExamples:
    packed = read_pack(folder, resolution=resolution)
    if packed is None:
        raise InputError(
            folder, f"unreadable pack folder, or packed at another resolution than {resolution}"
        )
    return packed


def _dataset_examples(
    root: Path,
    resolution: int,
    channels: int,
    axis: int,
    max_cases: int | None,
    cache_dir: str | os.PathLike | None,
) -> PackedExamples:
    dataset = open_dataset(root)
    build = lambda: load_examples(dataset, resolution, channels, axis, max_cases=max_cases)  # noqa: E731
    if cache_dir is not None and max_cases is None:
        return cached_examples(cache_dir, dataset, resolution, axis, channels, build)
    images, labels, case_ids = build()
    return PackedExamples(dataset.name, dataset.labels, images, labels, case_ids)


def _add_tasks(
    tasks: list[ArrayTask],
    examples: PackedExamples,
    min_examples: int,
    queries: np.ndarray | None = None,
) -> int:
    """Append one task per usable label value of `examples`; returns how many were added. With
    `queries` (N,) bool (the query examples), a task also needs a non-empty query and prompt."""
    added = 0
    for value in np.unique(examples.label_maps):
        if value == 0:
            continue
        masks = np.asarray(examples.label_maps == value)
        filled = masks.reshape(len(masks), -1).any(axis=1)
        if int(filled.sum()) < min_examples:
            continue
        if queries is not None and not ((filled & queries).any() and (filled & ~queries).any()):
            continue
        name = examples.labels.get(int(value), f"label_{int(value)}")
        tasks.append(
            ArrayTask(
                f"{examples.name}/{name}",
                examples.name,
                examples.images,
                masks,
                examples.case_ids,
                queries,
            )
        )
        added += 1
    return added
