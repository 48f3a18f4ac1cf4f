"""Quick-look pictures of segmentations: an image with mask contours, or a montage of volume slices.

Contours are the mask minus its erosion (one pixel wide). Colours are RGB uint8 triples.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from promptseg.data.io import slice_volume
from promptseg.data.preprocess import normalize_intensity, to_channels_first

Colour = tuple[int, int, int]
RED: Colour = (255, 40, 40)
GREEN: Colour = (40, 220, 40)
LABEL_COLOURS: tuple[Colour, ...] = (
    RED,
    GREEN,
    (60, 120, 255),
    (255, 200, 0),
    (220, 60, 220),
    (0, 210, 210),
)
Contour = tuple[np.ndarray, Colour]  # (mask (H, W) bool, colour)


def contour(mask: np.ndarray) -> np.ndarray:
    """(H, W) mask -> (H, W) bool boundary: mask XOR its 3x3 erosion (the image border counts as
    outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(
        mask, structure=np.ones((3, 3), dtype=bool), border_value=0
    )


def display_rgb(image: np.ndarray) -> np.ndarray:
    """A 2D image (H, W[, C]) -> (H, W, 3) uint8 for display.

    uint8 images keep their values; others are clipped to their 0.5-99.5 percentiles. Grayscale is
    replicated to RGB and an alpha channel dropped.
    """
    planes = to_channels_first(np.asarray(image), 3, source="overlay image")
    if planes.dtype == np.uint8:
        scaled = planes.astype(np.float32) / 255.0
    else:
        scaled = normalize_intensity(planes, source="overlay image")
    return np.round(np.moveaxis(scaled, 0, -1) * 255).astype(np.uint8)


def draw_contours(rgb: np.ndarray, contours: Sequence[Contour]) -> np.ndarray:
    """Paint the contour of each mask, in its colour, onto a copy of `rgb` (H, W, 3) uint8 (later
    ones on top)."""
    out = rgb.copy()
    for mask, colour in contours:
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {rgb.shape[:2]}")
        out[contour(mask)] = colour
    return out


def overlay(image: np.ndarray, contours: Sequence[Contour]) -> np.ndarray:
    """A 2D image (H, W[, C]) with mask contours drawn on it -> (H, W, 3) uint8."""
    return draw_contours(display_rgb(image), contours)


def montage_indices(count: int, max_slices: int = 16) -> np.ndarray:
    """Up to `max_slices` evenly spaced slice indices in 0..count-1 (both ends included)."""
    return np.unique(np.round(np.linspace(0, count - 1, min(count, max_slices))).astype(int))


def montage(
    volume: np.ndarray, contours: Sequence[Contour], axis: int, max_slices: int = 16, gap: int = 2
) -> np.ndarray:
    """A grid of up to `max_slices` evenly spaced slices of `volume` along `axis`, with contours.

    volume: (X, Y, Z); each contour mask has the volume's shape. Intensities are scaled jointly over
    the chosen slices. Slices appear in array order (rows of the slice downwards), left to right and
    top to bottom, separated by `gap` black pixels. Returns (rows * h + gaps, cols * w + gaps, 3)
    uint8.
    """
    slices = slice_volume(np.asarray(volume), axis)
    indices = montage_indices(slices.shape[0], max_slices)
    shown = normalize_intensity(slices[indices], source="overlay volume")
    masks = [
        (slice_volume(np.asarray(mask, dtype=bool), axis)[indices], colour)
        for mask, colour in contours
    ]
    height, width = shown.shape[1:]
    cols = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / cols)
    grid = np.zeros(
        (rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap, 3), dtype=np.uint8
    )
    for n in range(len(indices)):
        tile = np.repeat(np.round(shown[n] * 255).astype(np.uint8)[..., None], 3, axis=-1)
        tile = draw_contours(tile, [(m[n], colour) for m, colour in masks])
        top, left = (n // cols) * (height + gap), (n % cols) * (width + gap)
        grid[top : top + height, left : left + width] = tile
    return grid
