"""Annotated volumes as prompts (issue 18 item 1): the slices of a prompt volume that the model is
prompted with, cut in the same orientation as the query volumes.

A prompt volume is an image volume (NIfTI, a DICOM series folder, or an (X, Y, Z) array) and its
label volume on the same voxel grid. Both are brought to their closest RAS orientation through their
own affines (io.canonical_view, as Segmenter.segment_volume does for queries), so a prompt volume
stored LPS and a query stored RAS are sliced alike. `choose_slices` then picks K slices along the
axis: most of them spread over the labelled extent (at the centres of K equal parts of the slices
holding the label, so the near-empty tips are avoided), and a few just outside it, without the
label, so that the prompts show where the target ends.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from promptseg.data.io import (
    ImageData,
    canonical_view,
    check_image_array,
    read_image,
    read_label,
    slice_volume,
)
from promptseg.data.preprocess import all_finite
from promptseg.engine.prompts_input import Prompt, load_2d, select_label
from promptseg.errors import InputError

VolumeInput = str | os.PathLike | np.ndarray | ImageData


@dataclass
class VolumeSlices:
    """K prompt slices of one prompt volume: images (K, H, W) and label maps (K, H, W) in the
    volume's closest RAS orientation, the slice indices along the axis, and the labels' path."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    source: str


def empty_slice_count(slices: int) -> int:
    """Default number of the K prompt slices taken without the label: one in four (0 for K < 4)."""
    return slices // 4


def _as_data(value: VolumeInput, label: bool, what: str) -> ImageData:
    """A path (NIfTI, DICOM series folder), ImageData or (X, Y, Z) array -> ImageData."""
    if isinstance(value, ImageData):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_label(value) if label else read_image(value)
    return ImageData(check_image_array(np.asarray(value), what), True, None, None, what)


def read_volumes(
    images: VolumeInput | Sequence[VolumeInput], labels: VolumeInput | Sequence[VolumeInput]
) -> tuple[ImageData | list[ImageData], ImageData | list[ImageData]]:
    """Prompt volume(s) and label volume(s), as volume_prompts takes them, read once into ImageData
    (for cutting them along several axes)."""
    if isinstance(images, (list, tuple)) and isinstance(labels, (list, tuple)):
        return [_as_data(i, False, "prompt volume") for i in images], [
            _as_data(m, True, "prompt volume labels") for m in labels
        ]
    return _as_data(images, False, "prompt volume"), _as_data(labels, True, "prompt volume labels")


def oriented_pair(image: VolumeInput, labels: VolumeInput) -> tuple[np.ndarray, np.ndarray, str]:
    """A prompt volume and its labels -> (image, labels) (X, Y, Z) views in their closest RAS
    orientation (each through its own affine; labels without one take the image's) and the labels'
    name. InputError naming the file when either is not 3D, the image holds NaN or Inf anywhere, or
    their oriented shapes differ."""
    data = _as_data(image, False, "prompt volume")
    label_data = _as_data(labels, True, "prompt volume labels")
    if data.array.ndim != 3:
        raise InputError(data.path, f"a prompt volume must be 3D, got shape {data.array.shape}")
    if label_data.array.ndim != 3:
        raise InputError(
            label_data.path, f"prompt labels must be 3D, got shape {label_data.array.shape}"
        )
    if not np.issubdtype(label_data.array.dtype, np.integer):
        raise InputError(
            label_data.path, f"prompt labels must hold integers, got {label_data.array.dtype}"
        )
    if not all_finite(data.array):  # as for queries, whichever slices are chosen
        raise InputError(data.path, "volume contains non-finite intensities (NaN or Inf)")
    oriented = canonical_view(data.array, data.affine)
    label_affine = label_data.affine if label_data.affine is not None else data.affine
    oriented_labels = canonical_view(label_data.array, label_affine)
    if oriented_labels.shape != oriented.shape:
        raise InputError(
            label_data.path,
            f"prompt labels of shape {label_data.array.shape} do not match the "
            f"prompt volume {data.path} of shape {data.array.shape}",
        )
    return oriented, oriented_labels, label_data.path


def choose_slices(wanted: np.ndarray, slices: int, empty: int) -> np.ndarray:
    """Slice indices for prompts from wanted (S,) bool (the slices holding the label): `slices` in
    all,
    `empty` of them just outside the labelled extent (alternately below and above it, stepping away
    by a tenth of the extent) and the rest at the centres of equal parts of the holding slices.
    Fewer when the volume has fewer slices of either kind. Sorted, unique int64."""
    holding = np.flatnonzero(wanted)
    free = np.flatnonzero(~wanted)
    empty = min(empty, free.size, max(slices - 1, 0))
    count = min(slices - empty, holding.size)
    positions = (
        np.floor((np.arange(count) + 0.5) * holding.size / count).astype(int) if count else []
    )
    chosen = list(holding[positions])
    if empty and holding.size:
        low, high = int(holding[0]), int(holding[-1])
        step = max(1, round((high - low + 1) / 10))
        below = [s for s in free if s < low][::-1]  # nearest first
        above = [s for s in free if s > high]
        sides = [below[step - 1 :: step] or below, above[step - 1 :: step] or above]
        picked: list[int] = []
        while len(picked) < empty and (sides[0] or sides[1]):
            for side in sides:
                if side and len(picked) < empty:
                    picked.append(int(side.pop(0)))
        chosen += picked
    return np.unique(np.asarray(chosen, dtype=np.int64))


def volume_slices(
    image: VolumeInput,
    labels: VolumeInput,
    label: int | Sequence[int] | None = None,
    slices: int = 8,
    axis: int = 2,
    empty: int | None = None,
) -> VolumeSlices:
    """The prompt slices of one annotated volume along `axis` of its closest RAS orientation.

    label: the label value(s) the prompts show (None: any non-zero value); slices: K; empty: how
    many
    of them lie outside the labelled extent (default empty_slice_count(K)); a label that none of
    them shows adds its largest slice (K + 1, ...). InputError naming the
    labels file when the volume holds none of the labels, or when labels and image do not match.
    """
    if slices < 1:
        raise InputError("--prompt-slices", f"must be at least 1, got {slices}")
    oriented, oriented_labels, source = oriented_pair(image, labels)
    image_slices, label_slices = slice_volume(oriented, axis), slice_volume(oriented_labels, axis)
    wanted_values = None if label is None else np.atleast_1d(np.asarray(label, dtype=np.int64))
    per_slice = label_slices.reshape(len(label_slices), -1)
    for value in [] if wanted_values is None else wanted_values:
        if not np.any(per_slice == value):
            present = sorted(int(v) for v in np.unique(per_slice) if v != 0)
            raise InputError(
                source, f"the prompt volume holds no label {value} (labels present: {present})"
            )
    wanted = (
        per_slice.any(axis=1)
        if wanted_values is None
        else np.isin(per_slice, wanted_values).any(axis=1)
    )
    if not wanted.any():
        raise InputError(source, "the prompt volume holds no label (all voxels are 0)")
    chosen = choose_slices(wanted, slices, empty_slice_count(slices) if empty is None else empty)
    for value in [] if wanted_values is None else wanted_values:  # every label shown at least once
        area = (per_slice == value).sum(axis=1)
        if not area[chosen].any():
            chosen = np.unique(np.append(chosen, int(np.argmax(area))))
    return VolumeSlices(
        np.ascontiguousarray(image_slices[chosen]),
        np.ascontiguousarray(label_slices[chosen]),
        chosen,
        source,
    )


def volume_prompts(
    images: VolumeInput | Sequence[VolumeInput],
    labels: VolumeInput | Sequence[VolumeInput],
    label: int | Sequence[int] | None = None,
    slices: int = 8,
    axis: int = 2,
    empty: int | None = None,
) -> list[Prompt]:
    """Mask prompts from one annotated volume, or from several given as equal-length sequences
    (`slices` from each, mixed in one prompt set). The masks are binary (the label, or any non-zero
    value for None) for one label, and the label-map slices themselves for several
    (encode_labels)."""
    several = isinstance(images, (list, tuple))
    pairs = list(zip(images, labels)) if several else [(images, labels)]
    if several and (not isinstance(labels, (list, tuple)) or len(images) != len(labels)):
        raise InputError("labels", "give one label volume per prompt volume")
    several_labels = label is not None and np.ndim(label) > 0
    if several_labels and len(label) == 1:  # type: ignore[arg-type]
        label, several_labels = int(label[0]), False  # type: ignore[index]
    prompts = []
    for image, label_volume in pairs:
        cut = volume_slices(image, label_volume, label, slices, axis, empty)
        masks = (
            cut.labels
            if several_labels
            else (cut.labels > 0 if label is None else cut.labels == label)
        )
        prompts += [
            Prompt(
                image=i,
                kind="mask",
                mask=m.astype(cut.labels.dtype),
                name=f"{cut.source} slice {n}",
            )
            for i, m, n in zip(cut.images, masks, cut.indices)
        ]
    return prompts


def with_label_resolved(prompts: Sequence[Prompt], label: int) -> list[Prompt]:
    """The mask prompts' label maps reduced to binary masks of `label` (InputError naming a mask
    file
    that lacks it), so that they can join binary prompt-volume slices in one set encoded with label
    None; other prompts unchanged."""
    resolved = []
    for prompt in prompts:
        if prompt.kind == "mask" and prompt.mask is not None:
            mask, source = load_2d(
                prompt.mask, is_label=True, what=f"{prompt.name or 'prompt'} mask"
            )
            binary = select_label(mask, label, source).astype(np.uint8)
            prompt = Prompt(image=prompt.image, kind="mask", mask=binary, name=prompt.name)
        resolved.append(prompt)
    return resolved


@contextlib.contextmanager
def empty_masks_expected() -> Iterator[None]:
    """Silence the "empty prompt mask" warning within the block: prompt slices without the label
    are chosen on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*empty prompt mask")
        yield
