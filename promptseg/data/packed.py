"""Packed dataset cache: a dataset's examples at one resolution, decoded once and memory-mapped
after.

`build_tasks(..., cache_dir=DIR)` reads each dataset folder once (PNG / JPEG / NIfTI decoding,
normalisation, resizing) and writes DIR/<dataset>-r<R>-a<axis>-c<C>/ with

    images.npy    (N, c, R, R) uint8, c = 1 when every example is grey (replicated to C on use),
    else C
    labels.npy    (N, R, R) uint8 label values
    case_ids.npy  (N,) case names
    packed.json   dataset name, label names, the build parameters and a signature of the source
    files (and "slices": "closest-ras" when some volume is cut in another order than stored)

Later runs memory-map the arrays (no decoding, pages shared between processes) as long as the
signature (every case file's name, size and modification time) still matches; a changed source
folder is packed again. A pack folder is written under a temporary name and renamed into place, so
an interrupted pack never leaves a half-written cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from promptseg.data.io import (
    NIFTI_EXTENSIONS,
    NUMPY_EXTENSIONS,
    PILLOW_EXTENSIONS,
    is_stored_canonical,
)
from promptseg.data.layouts import DatasetInfo
from promptseg.files import file_extension

FORMAT = "promptseg-packed-v1"
# packed.json's "slices" for datasets with volumes cut in their closest RAS orientation rather than
# in stored order (reoriented_when_sliced); absent where the two are the same.
ORIENTED_SLICES = "closest-ras"


@dataclass
class PackedExamples:
    """One dataset's examples: images (N, c, R, R) uint8, labels (N, R, R) uint8, case_ids (N,),
    label names by value, and the dataset name."""

    name: str
    labels: dict[int, str]
    images: np.ndarray
    label_maps: np.ndarray
    case_ids: np.ndarray


def source_signature(dataset: DatasetInfo) -> list[list]:
    """[relative path, size, mtime_ns] of every file the examples are read from, sorted."""
    paths = {
        p for case in dataset.cases if case.label_path for p in [*case.image_paths, case.label_path]
    }
    entries = []
    for path in sorted(paths):
        stat = os.stat(path)
        entries.append([os.path.relpath(path, dataset.root), stat.st_size, stat.st_mtime_ns])
    return entries


def pack_folder(
    cache_dir: str | os.PathLike, dataset: DatasetInfo, resolution: int, axis: int, channels: int
) -> Path:
    """The pack folder of `dataset` at these build parameters under `cache_dir`."""
    return Path(cache_dir) / f"{dataset.name}-r{resolution}-a{axis}-c{channels}"


def _expected_meta(dataset: DatasetInfo, resolution: int, axis: int, channels: int) -> dict:
    meta = {
        "format": FORMAT,
        "name": dataset.name,
        "labels": {str(value): name for value, name in dataset.labels.items()},
        "resolution": resolution,
        "axis": axis,
        "channels": channels,
        "signature": source_signature(dataset),
    }
    if reoriented_when_sliced(dataset):
        meta["slices"] = ORIENTED_SLICES
    return meta


def reoriented_when_sliced(dataset: DatasetInfo) -> bool:
    """Whether some volume of `dataset` is cut in another order than stored (its closest RAS
    orientation, index.oriented_case, is not its stored one; DICOM volumes are counted as such
    without reading them), from the NIfTI headers alone.

    Packs of datasets where it is False hold the same slices as before volumes were reoriented, so
    they stay valid; the others carry "slices" in packed.json, and older packs of them are stale."""
    for case in dataset.cases:
        if case.label_path is None:
            continue
        for path in [*case.image_paths, case.label_path]:
            ext = file_extension(path)
            if ext in NIFTI_EXTENSIONS:
                try:
                    affine = nib.load(path).affine
                except Exception:  # noqa: BLE001 (unreadable: the build reports it, one line)
                    return True
                if not is_stored_canonical(affine):
                    return True
            elif ext not in PILLOW_EXTENSIONS + NUMPY_EXTENSIONS:
                return True  # DICOM and anything else with a geometry
    return False


def is_pack(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a pack folder (holds packed.json)."""
    return (Path(folder) / "packed.json").is_file()


def find_packs(root: str | os.PathLike) -> list[Path]:
    """[root] when `root` is a pack folder, else its pack sub-folders (sorted); [] when none."""
    root = Path(root)
    if is_pack(root):
        return [root]
    return (
        sorted(child for child in root.iterdir() if child.is_dir() and is_pack(child))
        if root.is_dir()
        else []
    )


def pack_dataset_name(folder: str | os.PathLike) -> str:
    """The dataset name recorded in a pack folder ('' when unreadable)."""
    try:
        return str(json.loads((Path(folder) / "packed.json").read_text()).get("name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def read_pack(
    folder: Path, expected: dict | None = None, resolution: int | None = None
) -> PackedExamples | None:
    """The memory-mapped examples of `folder`, or None when it is unreadable, when its packed.json
    differs from `expected` (given when the source folder is at hand) or when it was packed at
    another `resolution` (checked when the source is not at hand, e.g. a cache carried to a GPU
    machine)."""
    try:
        meta = json.loads((folder / "packed.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if expected is not None and meta != expected:
        return None
    if resolution is not None and meta.get("resolution") != resolution:
        return None
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        label_maps = np.load(folder / "labels.npy", mmap_mode="r")
        case_ids = np.load(folder / "case_ids.npy")
    except (OSError, ValueError):
        return None
    if len(images) != len(label_maps) or len(images) != len(case_ids):
        return None
    labels = {int(value): name for value, name in meta["labels"].items()}
    return PackedExamples(meta["name"], labels, images, label_maps, case_ids)


def write_pack(
    folder: Path, meta: dict, images: np.ndarray, label_maps: np.ndarray, case_ids: np.ndarray
) -> None:
    """Write a pack folder atomically (temporary sibling folder, then rename). Grey images
    (all channels equal) are stored with one channel."""
    if images.shape[1] > 1 and bool((images == images[:, :1]).all()):
        images = images[:, :1]
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        np.save(temporary / "images.npy", np.ascontiguousarray(images))
        np.save(temporary / "labels.npy", np.ascontiguousarray(label_maps))
        np.save(temporary / "case_ids.npy", np.asarray(case_ids).astype(str))
        (temporary / "packed.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def cached_examples(
    cache_dir: str | os.PathLike,
    dataset: DatasetInfo,
    resolution: int,
    axis: int,
    channels: int,
    build,
) -> PackedExamples:
    """Examples of `dataset` from its pack folder, packing them first (with `build()` -> (images,
    labels, case_ids)) when the folder is missing or stale."""
    folder = pack_folder(cache_dir, dataset, resolution, axis, channels)
    expected = _expected_meta(dataset, resolution, axis, channels)
    packed = read_pack(folder, expected)
    if packed is None:
        images, label_maps, case_ids = build()
        write_pack(folder, expected, images, label_maps, case_ids)
        packed = read_pack(folder, expected)
        if packed is None:  # pragma: no cover - the folder was just written
            raise OSError(f"{folder}: packed cache unreadable right after writing")
    return packed
