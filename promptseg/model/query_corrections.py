"""Corrections on the query as model input (issue 18 item 3): the maps a user's clicks and scribbles
on the query itself become.

A model built with `ModelConfig.query_corrections` reads, beside each query image, CHANNELS maps at
its resolution: channel 0 holds the positive corrections (the target is here), channel 1 the
negative ones (it is not). Each marked pixel (a click's, or every pixel of a scribble's strokes)
spreads as a Gaussian of CLICK_SIGMA pixels: a pixel's value is exp(-d^2 / (2 sigma^2)), d its
distance to the nearest marked pixel of that polarity, so a click is a bump of peak 1 and a
scribble a tube along its strokes. All-zero maps mean "no correction" and leave the model's output
exactly as without them (the encoder's correction stem has no bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

CHANNELS = 2  # positive, negative
CLICK_SIGMA = 2.0  # pixels at the model's resolution
# the parameters a query-corrections model adds: the encoder's stem and the decoder's fuse
CORRECTION_PREFIXES = ("encoder.correction_stem.", "query_decoder.correction_fuse.")


def spread(marks: np.ndarray, sigma: float = CLICK_SIGMA) -> np.ndarray:
    """(R, R) bool marked pixels -> (R, R) float32 exp(-d^2 / (2 sigma^2)), d the distance to the
    nearest marked pixel (zeros when none is marked)."""
    if not marks.any():
        return np.zeros(marks.shape, np.float32)
    distance = ndimage.distance_transform_edt(~marks)
    return np.exp(-(distance**2) / (2.0 * sigma**2)).astype(np.float32)


def correction_maps(positive: np.ndarray, negative: np.ndarray) -> torch.Tensor:
    """(R, R) bool marks of each polarity -> (CHANNELS, R, R) float32 model input."""
    return torch.from_numpy(np.stack([spread(positive), spread(negative)]))


def click_maps(clicks: Sequence[tuple[float, float, bool]], size: int) -> torch.Tensor:
    """Clicks (x, y, positive) in pixels of a (size, size) query, x the column (rounded to the
    nearest pixel) -> (CHANNELS, size, size) float32 correction maps."""
    marks = np.zeros((CHANNELS, size, size), bool)
    for x, y, positive in clicks:
        row = min(max(round(float(y)), 0), size - 1)
        column = min(max(round(float(x)), 0), size - 1)
        marks[0 if positive else 1, row, column] = True
    return correction_maps(marks[0], marks[1])
