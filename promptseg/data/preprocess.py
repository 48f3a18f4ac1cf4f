"""Intensity normalisation and resizing to the model's input convention (docs/design.md section
2.1).

Model inputs are (C, R, R) float32 in [0, 1] with C = 3 (grayscale replicated); masks are (R, R).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.errors import InputError

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
    "brain": (0.0, 80.0),
}


def all_finite(array: np.ndarray, chunk_elements: int = 1 << 20) -> bool:
    """Whether every value of `array` is finite, checked a slab at a time (memory independent of
    size)."""
    if array.dtype.kind not in "fc":
        return True
    if array.ndim == 0:
        return bool(np.isfinite(array))
    per_row = max(1, array[:1].size)
    step = max(1, chunk_elements // per_row)  # slabs along the first axis are views of any array
    return all(
        bool(np.isfinite(array[start : start + step]).all())
        for start in range(0, array.shape[0], step)
    )


def normalize_intensity(
    image: np.ndarray,
    source: str | None = None,
    window: str | tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Scale an image of any shape to float32 in [0, 1].

    CT images take a window (a preset name from CT_WINDOWS or (low, high) in HU); everything else is
    clipped to the 0.5-99.5 percentiles of the image and rescaled. A constant image maps to zeros.
    Any intensities within the float64 range work (the arithmetic is float64, pre-scaled when
    differences could overflow). Raises InputError (naming `source`) on non-finite intensities.
    """
    with np.errstate(
        invalid="ignore", over="ignore"
    ):  # values float64 cannot hold become inf/NaN, refused below
        data = np.asarray(image).astype(np.float64)
    lo, hi = (
        (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    )  # NaN and Inf propagate
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            source,
            "image contains non-finite intensities (NaN or Inf, or beyond the float64 range)",
        )
    if window is not None:
        low, high = CT_WINDOWS[window] if isinstance(window, str) else window
    else:
        magnitude = max(-lo, hi)
        if magnitude > 1e300:  # percentile interpolation and differences would overflow float64
            data /= magnitude
        low, high = (float(v) for v in np.percentile(data, percentiles))
    if high <= low:
        return np.zeros(data.shape, dtype=np.float32)
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)


def image_layout(image: np.ndarray) -> str:
    """The layout of a 2D image array: "hw", "hwc" (C in 1, 3, 4) or "chw" (C in 1, 3, 4); "" for
    none.

    Channels-last wins when both ends could be channels (a 1- or 3-pixel-high RGB image is (H, W,
    3)).
    """
    if image.ndim == 2:
        return "hw"
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return "hwc"
    if image.ndim == 3 and image.shape[0] in (1, 3, 4):
        return "chw"
    return ""


def channels_last(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) image as an (H, W, C) view; other layouts unchanged."""
    return np.moveaxis(image, 0, -1) if image_layout(image) == "chw" else image


def to_channels_first(image: np.ndarray, channels: int, source: str | None = None) -> np.ndarray:
    """(H, W) or (H, W, C) or (C, H, W) with C in {1, 3, 4} -> (channels, H, W) (see image_layout).

    Grayscale is replicated to 3 channels; RGB becomes luminance for a 1-channel model; an alpha
    channel is dropped. Any other layout raises InputError naming `source`.
    """
    layout = image_layout(image)
    if layout == "hw":
        planes = image[None]
    elif layout == "hwc":
        planes = np.moveaxis(image, -1, 0)
    elif layout == "chw":
        planes = image
    else:
        raise InputError(
            source, f"expected a 2D image with 1, 3 or 4 channels, got shape {image.shape}"
        )
    if planes.shape[0] == 4:
        planes = planes[:3]
    if planes.shape[0] == channels:
        return planes
    if channels == 3 and planes.shape[0] == 1:
        return np.repeat(planes, 3, axis=0)
    if channels == 1 and planes.shape[0] == 3:
        return (0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2])[None].astype(
            planes.dtype
        )
    raise InputError(source, f"cannot convert {planes.shape[0]} channels to {channels}")


def resize_image(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., C, H, W) float images to `size` (antialiased when shrinking)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == size:
        return image
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:]).float()
    shrinking = size[0] < flat.shape[-2] or size[1] < flat.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.reshape(*lead, *out.shape[-3:])


def resize_mask(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize (..., H, W) binary or soft masks to `size` with area-faithful bilinear weights.

    Returns float32 in [0, 1]; threshold at 0.5 for a binary mask.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(mask.shape[-2:]) == size:
        return mask.float()
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    shrinking = size[0] < flat.shape[-2] or size[1] < flat.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out.reshape(*lead, *size).clamp_(0.0, 1.0)


def check_image(image: np.ndarray, channels: int = 3, source: str | None = None) -> None:
    """The InputErrors prepare_image raises on `image` (layout and channels, non-finite
    intensities), without preparing it."""
    to_channels_first(np.asarray(image), channels, source)
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = (float(np.min(image)), float(np.max(image))) if np.size(image) else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            source,
            "image contains non-finite intensities (NaN or Inf, or beyond the float64 range)",
        )


def prepare_image(
    image: np.ndarray,
    resolution: int,
    channels: int = 3,
    source: str | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """A raw 2D image (H, W[, C]) -> model input (channels, R, R) float32 in [0, 1]."""
    planes = to_channels_first(np.asarray(image), channels, source)
    if normalize:
        planes = normalize_intensity(planes, source)
    return resize_image(
        torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)), resolution
    )
