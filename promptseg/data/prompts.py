"""Prompt types and sparse prompts (click, box, scribble) derived from masks and rasterised to maps.

A prompt map is an (H, W) float32 tensor in {0, 1} on the image grid: the mask itself for a mask
prompt, or the rasterised click / box / scribble for a sparse (One-Prompt style) prompt. Coordinates
are pixels, x along the columns (width) and y along the rows (height).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

CLICK_COORDINATE_LIMIT = 1e7  # |x|, |y| beyond any image; its square still fits float32
SPARSE_KINDS: tuple[str, ...] = ("click", "box", "scribble")

MaskLike = np.ndarray | torch.Tensor


def _as_bool(mask: MaskLike) -> np.ndarray:
    """(H, W) numpy bool view of a numpy or torch mask (foreground = value > 0.5)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask > 0.5


def default_click_radius(size: tuple[int, int]) -> float:
    """Click disk radius in pixels for an (H, W) grid: max(2, min(H, W) / 32)."""
    return max(2.0, min(size) / 32.0)


def rasterize_clicks(
    points: Sequence[tuple[float, float]], size: tuple[int, int], radius: float | None = None
) -> torch.Tensor:
    """A filled disk of `radius` pixels around each (x, y) click -> (H, W) float32 in {0, 1}."""
    height, width = size
    radius = default_click_radius(size) if radius is None else float(radius)
    out = torch.zeros(height, width)
    if len(points) == 0:
        return out
    # Clicks far outside (up to the float64 limit) are clipped first: float32 would overflow to inf.
    far = float(CLICK_COORDINATE_LIMIT)
    pts = torch.as_tensor(
        np.clip(np.asarray(points, dtype=np.float64), -far, far).astype(np.float32).reshape(-1, 2)
    )
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    dist2 = (xs - pts[:, 0, None, None]) ** 2 + (ys - pts[:, 1, None, None]) ** 2
    return (dist2 <= radius * radius).any(dim=0).float()


def rasterize_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """A filled rectangle of ones for box (x0, y0, x1, y1), inclusive pixel coordinates clipped to
    the image -> (H, W) float32. A box entirely outside the image gives zeros."""
    height, width = size
    x0, y0, x1, y1 = (round(v) for v in box)
    x0, x1 = max(min(x0, x1), 0), min(max(x0, x1), width - 1)
    y0, y1 = max(min(y0, y1), 0), min(max(y0, y1), height - 1)
    out = torch.zeros(height, width)
    if x0 <= x1 and y0 <= y1:
        out[y0 : y1 + 1, x0 : x1 + 1] = 1.0
    return out


def _interior_weights(mask: np.ndarray) -> np.ndarray:
    """Sampling weights over the (H, W) mask growing with the squared distance to its boundary."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return depth.astype(np.float64) ** 2


def _sample_points(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` (x, y) pixel positions drawn with probability proportional to `weights` (H, W)."""
    flat = weights.ravel()
    index = rng.choice(flat.size, size=count, p=flat / flat.sum())
    rows, cols = np.divmod(index, weights.shape[1])
    return np.stack([cols, rows], axis=1).astype(np.float64)


def click_from_mask(mask: MaskLike, rng: np.random.Generator) -> tuple[float, float] | None:
    """A click (x, y) well inside the (H, W) mask (probability ~ squared distance to the boundary);
    None for an empty mask."""
    fg = _as_bool(mask)
    if not fg.any():
        return None
    x, y = _sample_points(_interior_weights(fg), 1, rng)[0]
    return float(x), float(y)


def box_from_mask(
    mask: MaskLike, rng: np.random.Generator, jitter: float = 0.05
) -> tuple[float, float, float, float] | None:
    """The bounding box (x0, y0, x1, y1) of the (H, W) mask, each side moved by Gaussian noise of
    std `jitter` x the box extent (at most one image size off), clipped to the image; None if
    empty."""
    fg = _as_bool(mask)
    if not fg.any():
        return None
    height, width = fg.shape
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)
    extent = np.array([cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1] * 2, dtype=np.float64)
    box += rng.normal(0.0, jitter, size=4) * extent
    x0, x1 = np.clip(sorted(box[[0, 2]]), 0, width - 1)
    y0, y1 = np.clip(sorted(box[[1, 3]]), 0, height - 1)
    return float(x0), float(y0), float(x1), float(y1)


def _bezier(control: np.ndarray, samples: int) -> np.ndarray:
    """Points (samples, 2) along the Bezier curve with control points (P, 2) (de Casteljau)."""
    t = np.linspace(0.0, 1.0, samples)[:, None, None]
    points = np.broadcast_to(control[None], (samples, *control.shape)).copy()
    while points.shape[1] > 1:
        points = (1 - t) * points[:, :-1] + t * points[:, 1:]
    return points[:, 0]


def scribble_from_mask(mask: MaskLike, rng: np.random.Generator) -> torch.Tensor:
    """1-3 thin smooth strokes inside the (H, W) mask -> (H, W) float32 in {0, 1}.

    Each stroke is a Bezier curve on 3-4 control points drawn deep inside the mask, 1-3 px
    thick, kept inside the mask eroded by ~2% of the image size (the plain mask when erosion empties
    it). Empty mask -> zeros; the stroke never leaves the mask.
    """
    fg = _as_bool(mask)
    height, width = fg.shape
    out = np.zeros((height, width), dtype=bool)
    if not fg.any():
        return torch.zeros(height, width)
    margin = max(1, round(min(height, width) / 64))
    inner = ndimage.binary_erosion(fg, iterations=margin)
    region = inner if inner.any() else fg
    weights = _interior_weights(region)
    samples = 4 * (height + width)
    for _ in range(int(rng.integers(1, 4))):
        control = _sample_points(weights, int(rng.integers(3, 5)), rng)
        curve = np.rint(_bezier(control, samples)).astype(np.int64)
        out[curve[:, 1].clip(0, height - 1), curve[:, 0].clip(0, width - 1)] = True
    thickness = int(rng.integers(1, 4))
    if thickness > 1:
        out = ndimage.binary_dilation(out, structure=np.ones((thickness, thickness), dtype=bool))
    out &= region
    if not out.any():
        x, y = _sample_points(weights, 1, rng)[0].astype(np.int64)
        out[y, x] = True
    return torch.from_numpy(out.astype(np.float32))


def sparse_prompt_map(mask: MaskLike, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """The rasterised sparse prompt of `kind` ('click', 'box' or 'scribble') for the (H, W) mask
    -> (H, W) float32 in {0, 1}; zeros for an empty mask."""
    fg = _as_bool(mask)
    size = (fg.shape[0], fg.shape[1])
    if kind == "click":
        point = click_from_mask(fg, rng)
        return rasterize_clicks([] if point is None else [point], size)
    if kind == "box":
        box = box_from_mask(fg, rng)
        return torch.zeros(size) if box is None else rasterize_box(box, size)
    if kind == "scribble":
        return scribble_from_mask(fg, rng)
    raise ValueError(f"unknown sparse prompt kind {kind!r}; expected one of {SPARSE_KINDS}")
