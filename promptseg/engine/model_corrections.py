"""Corrections read by the model (issue 18 item 3): a user's clicks and scribbles on the query, on
its own grid, brought to the model's input (promptseg.model.query_corrections).

A query-corrections model segments the query again with the marks as input, the prompts' cached
encodings untouched. Marks live on the query's stored grid: an (H, W) image's pixels (a click
(x, y, positive), x the column) or a volume's voxels array[x, y, z]. They are made into one bool
array per polarity on that grid (`mark_arrays`), which a volume then slices exactly as its image
(its closest RAS view, along the segmentation axis), and each marked pixel goes to the pixel of the
(R, R) model input that covers it (`marks_at_resolution`).

The model's pass and the local edits (promptseg.engine.corrections) combine in logit space
(`combined`): the edits of the prediction, plus what the corrections changed in the model's
output. The model alone learns first to flip the pixels around a click; the local edit fills the
region a click points at; their sum keeps both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from promptseg.engine.corrections import LOGIT_LIMIT, click_index, clipped_logits
from promptseg.errors import InputError
from promptseg.model.query_corrections import correction_maps


def mark_arrays(
    shape: tuple[int, ...], clicks: Sequence[tuple] = (), scribbles: Sequence[tuple] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) bool arrays of `shape` ((H, W) or (X, Y, Z)) marking the clicks and
    scribbles (strokes of that shape, positive). InputError naming --correct for a click outside
    the query or of the wrong length, naming scribbles for strokes of another shape."""
    positive, negative = np.zeros(shape, bool), np.zeros(shape, bool)
    for click in clicks:
        index, polarity = click_index(click, len(shape), shape)
        (positive if polarity else negative)[index] = True
    for strokes, polarity in scribbles:
        strokes = np.asarray(strokes) > 0
        if strokes.shape != shape:
            raise InputError("scribbles", f"shape {strokes.shape} differs from the query's {shape}")
        (positive if polarity else negative)[strokes] = True
    return positive, negative


def marks_at_resolution(marks: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W) bool marks on a query -> (R, R) bool marks on its model input (the query resized to
    R x R): each marked pixel marks the input pixel whose area holds its centre."""
    out = np.zeros((resolution, resolution), bool)
    rows, columns = np.nonzero(marks)
    if rows.size:
        height, width = marks.shape
        out[
            np.minimum(((rows + 0.5) * resolution / height).astype(int), resolution - 1),
            np.minimum(((columns + 0.5) * resolution / width).astype(int), resolution - 1),
        ] = True
    return out


def correction_input(positive: np.ndarray, negative: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W) bool marks of each polarity on a query -> (2, R, R) float32 model input."""
    return correction_maps(
        marks_at_resolution(positive, resolution), marks_at_resolution(negative, resolution)
    )


def combined(original: np.ndarray, edited: np.ndarray, corrected: np.ndarray) -> np.ndarray:
    """Probabilities of one shape: the prediction without corrections (`original`), its local
    edits (`edited`) and the model's output with the corrections as input (`corrected`) ->
    float32 sigmoid(logit(edited) + logit(corrected) - logit(original)), logits clipped to
    +-LOGIT_LIMIT."""
    logits = clipped_logits(edited) + clipped_logits(corrected) - clipped_logits(original)
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -LOGIT_LIMIT, LOGIT_LIMIT)))).astype(np.float32)
