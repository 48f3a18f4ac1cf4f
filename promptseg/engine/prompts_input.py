"""Validation and preparation of user prompts (image + mask, or image + click / box / scribble)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from promptseg.data.io import (
    as_label_values,
    canonical_view,
    check_image_array,
    read_image,
    read_label,
)
from promptseg.data.preprocess import channels_last, prepare_image, resize_mask
from promptseg.data.prompts import rasterize_box, rasterize_clicks
from promptseg.errors import InputError
from promptseg.model.prompt_types import PROMPT_TYPES

ArrayOrPath = np.ndarray | str


@dataclass
class Prompt:
    """One prompt: an image (H, W[, C]) and how it is annotated.

    kind is "mask" (mask: (H, W) label map or binary mask), "click" (points: [(x, y), ...] pixels),
    "box" (box: (x0, y0, x1, y1) pixels) or "scribble" (mask: (H, W) scribble strokes).
    """

    image: ArrayOrPath
    kind: str = "mask"
    mask: ArrayOrPath | None = None
    points: Sequence[tuple[float, float]] | None = None
    box: tuple[float, float, float, float] | None = None
    name: str | None = None


def load_2d(value: ArrayOrPath, is_label: bool, what: str) -> tuple[np.ndarray, str]:
    """An array or path -> (2D array (H, W[, C]) channels-last, a name for messages).

    Volumes, empty arrays and data types other than bool, integer and real float are refused with an
    InputError naming the file (or `what` for an array); a mask or label map given as an array must
    hold non-negative integers (0/1 floats count; soft masks are refused, not taken as foreground
    wherever they are above zero), like one read from a file.
    """
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        data = read_label(value) if is_label else read_image(value)
        array, source = data.array, data.path
        if data.is_volume and not (array.ndim == 3 and 1 in array.shape):
            raise InputError(source, f"{what} must be 2D, got a volume of shape {array.shape}")
        if (
            data.is_volume
        ):  # a NIfTI slice: in RAS orientation like query volumes, its length-1 axis dropped
            array = canonical_view(array, data.affine)
            array = np.squeeze(
                array, axis=max(axis for axis, n in enumerate(array.shape) if n == 1)
            )
    else:
        array, source = check_image_array(np.asarray(value), what), what
        if is_label:
            array = as_label_values(array, source)
    return channels_last(array), source


# The most distinct non-zero values a mask may hold when no label is chosen: more is a grayscale
# image passed as a mask (every non-zero pixel would be foreground), not a label map.
MAX_UNLABELLED_VALUES = 32


def check_not_grayscale(mask: np.ndarray, source: str) -> None:
    """InputError naming `source` when `mask`, read without a chosen label, holds more than
    MAX_UNLABELLED_VALUES distinct non-zero values."""
    count = int(np.count_nonzero(np.unique(mask)))
    if count > MAX_UNLABELLED_VALUES:
        raise InputError(
            source,
            f"holds {count} distinct non-zero values, so it looks like a grayscale image, not "
            f"a mask; pass a mask, or pick one value of a label map with --label N (label=N)",
        )


def select_label(mask: np.ndarray, label: int | None, source: str) -> np.ndarray:
    """(H, W) label map -> (H, W) float32 binary mask of `label` (any non-zero value when None).

    An empty result is returned alike with or without `label` (the caller warns): a mask without
    any non-zero value, or without `label`. A `label` absent from a mask holding other labels is
    an InputError (a wrong label), and so is a grayscale image passed as a mask without `label`."""
    if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InputError(source, f"mask must be 2D, got shape {mask.shape}")
    if not np.all(np.isfinite(mask)):
        raise InputError(source, "mask contains non-finite values")
    if label is None:
        check_not_grayscale(mask, source)
        return (mask > 0).astype(np.float32)
    if not np.any(mask == label):
        present = sorted(int(v) for v in np.unique(mask) if v != 0)
        if present:
            raise InputError(
                source,
                f"requested label {label} is absent from the mask (labels present: {present})",
            )
    return (mask == label).astype(np.float32)


def coordinates(values: object, source: str, what: str, width: int) -> np.ndarray:
    """Pixel coordinates -> (n, width) float64 array; InputError naming `source` unless finite
    numbers."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(source, f"{what} must be numbers, got {values!r}") from None
    if (
        array.size == 0
        or array.size % width
        or array.ndim > 2
        or (array.ndim == 2 and array.shape[1] != width)
    ):
        raise InputError(
            source, f"{what} must be groups of {width} numbers, got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise InputError(
            source, f"{what} must be finite numbers, got {array.reshape(-1, width).tolist()}"
        )
    return array.reshape(-1, width)


def prepare_prompt(
    prompt: Prompt, resolution: int, channels: int, label: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A Prompt -> (image (C, R, R), prompt map (R, R), prompt type id)."""
    if prompt.kind not in ("mask", "click", "box", "scribble"):
        raise InputError(prompt.name, f"unknown prompt kind {prompt.kind!r}")
    image, image_source = load_2d(prompt.image, is_label=False, what=prompt.name or "prompt image")
    size = image.shape[:2]
    if prompt.kind in ("mask", "scribble"):
        if prompt.mask is None:
            raise InputError(image_source, f"a {prompt.kind} prompt needs a mask")
        mask, mask_source = load_2d(
            prompt.mask, is_label=True, what=f"{prompt.name or 'prompt'} mask"
        )
        if mask.shape[:2] != size:
            raise InputError(
                mask_source,
                f"mask shape {mask.shape[:2]} differs from image shape {size} ({image_source})",
            )
        binary = torch.from_numpy(
            select_label(mask, label if prompt.kind == "mask" else None, mask_source)
        )
        if not bool(binary.any()):
            chosen = (
                f" (no pixel of label {label})"
                if label is not None and prompt.kind == "mask"
                else ""
            )
            warnings.warn(
                f"{mask_source}: empty prompt mask{chosen}; used as an example without the target",
                stacklevel=3,
            )
    elif prompt.kind == "click":
        if prompt.points is None or len(prompt.points) == 0:
            raise InputError(image_source, "a click prompt needs at least one point")
        binary = rasterize_clicks(
            coordinates(prompt.points, image_source, "click points (x, y)", 2), size
        )
    else:
        if prompt.box is None:
            raise InputError(image_source, "a box prompt needs (x0, y0, x1, y1)")
        box = coordinates(prompt.box, image_source, "box (x0, y0, x1, y1)", 4)
        if box.shape[0] != 1:
            raise InputError(
                image_source, f"a box prompt needs one (x0, y0, x1, y1), got {box.shape[0]} boxes"
            )
        binary = rasterize_box(tuple(box[0]), size)
    if prompt.kind in ("click", "box") and not bool(binary.any()):
        raise InputError(
            image_source, f"the {prompt.kind} lies outside the image of size {size[1]}x{size[0]}"
        )
    prepared = prepare_image(image, resolution, channels, source=image_source)
    return prepared, resize_mask(binary, resolution), PROMPT_TYPES[prompt.kind]


def as_prompts(
    images: Sequence[ArrayOrPath] | np.ndarray, masks: Sequence[ArrayOrPath] | np.ndarray | None
) -> list[Prompt]:
    """Pair mask-prompt images with their masks (lists, or stacked (K, H, W[, C]) arrays)."""
    if masks is None:
        raise InputError(
            None, "mask prompts need masks; pass Prompt objects for clicks, boxes or scribbles"
        )
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise InputError(None, f"{len(images)} prompt images but {len(masks)} masks")
    return [
        Prompt(image=i, mask=m, kind="mask", name=i if isinstance(i, str) else f"prompt {n}")
        for n, (i, m) in enumerate(zip(images, masks))
    ]
