"""Simulated corrections for training a query-corrections model (issue 18 item 3).

A simulated user looks at the model's prediction of a query and clicks where it is wrong: each
click goes into one of the largest error regions (connected components of prediction XOR truth),
largest first, at a pixel drawn with probability growing with its depth in the region (its
distance to the region's border, squared), so clicks fall well inside a region, as a user's do,
without always at its very centre. Positive where the target was missed, negative on a false
region. The trainer runs the rounds (promptseg.train.trainer): the prediction of round r sees the
clicks of the rounds before it. `clicked_regions` marks the error regions the clicks point at, where
the loss may weigh more (TrainConfig.correction_region_weight): a click says the whole region
around it is wrong, not only its own pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from promptseg.model.query_corrections import click_maps

Click = tuple[float, float, bool]  # (x, y, positive), x the column


def error_clicks(
    prediction: np.ndarray, truth: np.ndarray, count: int, rng: np.random.Generator
) -> list[Click]:
    """Up to `count` clicks (x, y, positive) on an (H, W) query, one in each of its `count` largest
    error regions (fewer when it has fewer); prediction and truth are (H, W) bool."""
    if count <= 0:
        return []
    labelled, regions = ndimage.label(prediction ^ truth)
    if regions == 0:
        return []
    sizes = np.bincount(labelled.ravel())[1:]
    clicks = []
    for region_index in np.argsort(-sizes, kind="stable")[:count]:
        region = labelled == region_index + 1
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        weights = depth[region] ** 2
        points = np.argwhere(region)
        row, column = points[rng.choice(len(points), p=weights / weights.sum())]
        clicks.append((float(column), float(row), bool(truth[row, column])))
    return clicks


def correction_counts(
    queries: int, fraction: float, max_clicks: int, rng: np.random.Generator
) -> np.ndarray:
    """(queries,) int: 0 for a query left uncorrected (probability 1 - fraction), else a click
    count drawn uniformly from 1..max_clicks."""
    chosen = rng.random(queries) < fraction
    return rng.integers(1, max_clicks + 1, queries) * chosen


def round_counts(counts: np.ndarray, rounds: int) -> list[np.ndarray]:
    """Split each query's click count over `rounds` rounds (earlier rounds get the remainder, so a
    corrected query gets at least one click in round 0)."""
    shares = [counts // rounds + (r < counts % rounds) for r in range(rounds)]
    return [np.asarray(share, dtype=int) for share in shares]


def maps_of(clicks: Sequence[Sequence[Click]], size: int, device: torch.device) -> torch.Tensor:
    """Clicks of each of B queries -> (B, 2, size, size) correction maps on `device`."""
    return torch.stack([click_maps(list(c), size) for c in clicks]).to(device)


def clicked_regions(
    prediction: np.ndarray, truth: np.ndarray, clicks: Sequence[Click]
) -> np.ndarray:
    """(H, W) bool: the error regions of the (H, W) bool prediction (components of prediction XOR
    truth) that hold one of the clicks."""
    labelled, _ = ndimage.label(prediction ^ truth)
    hit = {int(labelled[round(y), round(x)]) for x, y, _ in clicks} - {0}
    return np.isin(labelled, sorted(hit))
