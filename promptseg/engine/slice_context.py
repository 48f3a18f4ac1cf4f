"""Through-plane consistency of a volume segmented slice by slice (issue 18 item 2, inference side).

The model sees one slice at a time, so its masks flicker from slice to slice and light up structures
that resemble the target on slices far from it. `consistent_slices` uses the neighbouring slices:

1. the logits are smoothed along the slicing axis (a Gaussian of `sigma` slices), so a slice agrees
   with its neighbours and one-slice flickers fade;
2. the mask's 3D connected components (26-connectivity) smaller than `min_fraction` of the largest
   are dropped: the target is one body through the slices, and what lies apart from it, on slices
   without it in particular, is taken as a false positive.

Probabilities of dropped voxels are halved (below 0.5, so out of the mask, order kept).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_SIGMA = 2.0  # slices
DEFAULT_MIN_FRACTION = 0.5  # of the largest component's voxels
EPSILON = 1e-6


def smooth_through_plane(probabilities: np.ndarray, sigma: float) -> np.ndarray:
    """(S, H, W) probabilities -> (S, H, W) float32 probabilities whose logits are Gaussian-smoothed
    along axis 0 (the slices) with `sigma` slices; unchanged for sigma <= 0."""
    if sigma <= 0 or probabilities.shape[0] < 2:
        return probabilities.astype(np.float32, copy=True)
    p = np.clip(probabilities.astype(np.float32), EPSILON, 1.0 - EPSILON)
    logits = np.log(p) - np.log1p(-p)
    smoothed = ndimage.gaussian_filter1d(logits, sigma, axis=0, mode="nearest")
    return (1.0 / (1.0 + np.exp(-smoothed))).astype(np.float32)


def dominant_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """(S, H, W) bool -> bool of the 3D components (26-connected) holding at least `min_fraction`
    of the largest one's voxels (all False for an empty mask)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labelled.ravel())[1:]
    kept = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(labelled, kept)


def consistent_slices(
    probabilities: np.ndarray,
    sigma: float = DEFAULT_SIGMA,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> np.ndarray:
    """(S, H, W) slice probabilities (slices along axis 0) -> (S, H, W) float32 made consistent
    through the slices: logits smoothed (sigma slices), then components of the mask (> 0.5) below
    min_fraction of the largest halved out of it. min_fraction 0 keeps every component."""
    smoothed = smooth_through_plane(probabilities, sigma)
    if min_fraction <= 0:
        return smoothed
    mask = smoothed > 0.5
    dropped = mask & ~dominant_components(mask, min_fraction)
    smoothed[dropped] *= 0.5
    return smoothed
