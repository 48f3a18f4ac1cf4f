"""Corrections on the query (issue 18 item 3): clicks and scribbles that edit a predicted mask.

The shipped weights were not trained with corrections, so a correction is a local edit of the
probabilities, not another pass of the model (the prompts' encodings stay cached, untouched):

- a positive click outside the mask fills the region it points at: the voxels connected to the click
  that lie within R of it and whose intensity (smoothed by a Gaussian of SMOOTHING voxels) is
  within `tolerance` spreads of the click's, the spread being the standard deviation of the
  intensities around the click, at least SPREAD_FLOOR of the image's range; R is `reach` times the
  click's distance to the current mask (the gap a missed part leaves), at most `max_radius` of the
  image's smallest side;
- a negative click inside the mask removes the same kind of region, R being `reach` times the
  click's depth in the mask (the half-width of the wrong part it sits in);
- the model's own probabilities widen or narrow a click's region: a voxel's intensity tolerance
  grows by `model_weight` times how much likelier (in logit) than the clicked voxel the model finds
  it on the click's side (target for a positive click, background for a negative one), and shrinks
  by as much where the model finds it less likely;
- a click where the model was wrong also moves every logit toward the click's side, by `shift`
  times the clicked voxel's logit (at most `max_shift`): a positive click where the model says 0.2
  means it is too strict on this query, a negative one at 0.8 too lax;
- a scribble (a mask of strokes) and its polarity sets its strokes, widened by `scribble_width`
  voxels, and the similar voxels connected to them within that width.

Arrays are (H, W) for 2D queries and (X, Y, Z) for volumes. A click is (x, y, positive) on an
(H, W) image, x the column and y the row, or (x, y, z, positive) on a volume: the voxel
array[x, y, z] of its stored grid (a viewer's voxel indices). Distances use the voxel `spacing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from promptseg.data.io import read_label
from promptseg.errors import InputError

LOGIT_LIMIT = 8.0  # logits are clipped to +-this
INSIDE = 0.99  # probability given to voxels a positive correction adds
OUTSIDE = 0.01  # and to those a negative one removes
SPREAD_FLOOR = 0.1  # the intensity spread is at least this fraction of the image's range
SMOOTHING = 1.0  # voxels: the image is smoothed so that noise does not split a region

Click = tuple  # (x, y, positive) or (x, y, z, positive)
Scribble = tuple  # (mask of the strokes, positive)


@dataclass(frozen=True)
class CorrectionSettings:
    """How far a correction reaches (see the module docstring). The defaults were chosen on the
    training datasets' held cases (benchmarks/model/correction_tuning.py), never on the held-out
    datasets."""

    reach: float = 2.0
    tolerance: float = 1.0
    max_radius: float = 0.4
    scribble_width: float = 2.0
    model_weight: float = 1.0
    shift: float = 0.25
    max_shift: float = 2.0

    def __post_init__(self) -> None:
        """ValueError for a field that is not a finite number >= 0, or max_radius above 1."""
        for name, value in vars(self).items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not np.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"CorrectionSettings.{name} must be a finite number >= 0, got {value!r}"
                )
        if self.max_radius > 1:
            raise ValueError(
                f"CorrectionSettings.max_radius is a fraction of the smallest side (at most 1), "
                f"got {self.max_radius}"
            )


DEFAULT_SETTINGS = CorrectionSettings()


def click_index(click: Sequence, ndim: int, shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """A click -> (array index, positive). InputError naming --correct for a click of the wrong
    length, a polarity that is not a bool, or a point outside the array."""
    if len(click) != ndim + 1:
        wanted = "(x, y, positive)" if ndim == 2 else "(x, y, z, positive)"
        raise InputError("--correct", f"a click on a {ndim}D query is {wanted}, got {tuple(click)}")
    *coordinates, positive = click
    if not isinstance(positive, (bool, np.bool_)):
        raise InputError("--correct", f"a click's polarity must be True or False, got {positive!r}")
    try:
        point = [round(float(v)) for v in coordinates]
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            "--correct", f"click coordinates must be finite numbers, got {coordinates}"
        ) from None
    index = (point[1], point[0]) if ndim == 2 else tuple(point)
    if not all(0 <= i < n for i, n in zip(index, shape)):
        raise InputError(
            "--correct", f"click {tuple(coordinates)} lies outside the query of shape {shape}"
        )
    return index, bool(positive)


def _similar_region(
    image: np.ndarray | None,
    seed: np.ndarray,
    near: np.ndarray,
    tolerance: float,
    support: np.ndarray | None = None,
) -> np.ndarray:
    """The voxels of `near` (bool) connected to `seed` (bool) through voxels of similar intensity:
    within `tolerance` standard deviations (of the image within `near`) of the seed's median, the
    tolerance raised by `support` (same shape, in tolerance units; None: 0) voxel by voxel."""
    allowed = near.copy()
    if image is not None and tolerance > 0:
        values = image[near]
        spread = max(float(values.std()) if values.size else 0.0, SPREAD_FLOOR * _range(image))
        centre = float(np.median(image[seed]))
        limit = tolerance if support is None else np.maximum(tolerance + support, 0.0)
        allowed &= np.abs(image - centre) <= limit * spread + 1e-6
    allowed |= seed
    labelled, _ = ndimage.label(allowed)
    hit = np.unique(labelled[seed])
    return np.isin(labelled, hit[hit > 0])


def _range(image: np.ndarray) -> float:
    """The image's 1st to 99th percentile range of intensities."""
    low, high = np.percentile(image, [1, 99])
    return float(high - low)


def _ball(
    shape: tuple[int, ...], centre: tuple[int, ...], radius: float, spacing: np.ndarray
) -> np.ndarray:
    """Bool array of the voxels within `radius` (in spacing units) of `centre`."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return distance <= radius**2


def _click_region(
    probabilities: np.ndarray,
    image: np.ndarray | None,
    index: tuple[int, ...],
    positive: bool,
    spacing: np.ndarray,
    settings: CorrectionSettings,
) -> np.ndarray:
    """The voxels a click sets (bool, same shape): see the module docstring."""
    mask = probabilities > 0.5
    limit = settings.max_radius * float(min(n * s for n, s in zip(mask.shape, spacing)))
    # distance from the click to the other side: the mask for a positive click, else its outside
    other = mask if positive else ~mask
    if other[index]:  # already on the asked-for side: only the click's own neighbourhood
        radius = float(spacing.max())
    elif not other.any():
        radius = limit
    else:
        radius = float(ndimage.distance_transform_edt(~other, sampling=spacing)[index])
    radius = min(max(settings.reach * radius, float(spacing.max())), limit)
    seed = np.zeros_like(mask)
    seed[index] = True
    near = _ball(mask.shape, index, radius, spacing)
    support = None
    if settings.model_weight:  # voxels the model finds likelier than the click's side join sooner
        logits = clipped_logits(probabilities)
        support = settings.model_weight * (logits - logits[index]) * (1 if positive else -1)
    return _similar_region(image, seed, near, settings.tolerance, support)


def clipped_logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits of probabilities, clipped to +-LOGIT_LIMIT."""
    p = np.clip(probabilities, 1e-4, 1 - 1e-4)
    return np.clip(np.log(p / (1 - p)), -LOGIT_LIMIT, LOGIT_LIMIT)


def _shifted(
    probabilities: np.ndarray, index: tuple[int, ...], positive: bool, settings: CorrectionSettings
) -> np.ndarray:
    """All probabilities moved in logit by `shift` times the clicked voxel's distance (in logit)
    to the click's side of the threshold, at most max_shift: a positive click where the model
    says 0.2 means it is too strict everywhere, a negative one at 0.8 too lax."""
    logits = clipped_logits(probabilities)
    wrong = -logits[index] if positive else logits[index]
    if wrong <= 0:
        return probabilities
    amount = min(settings.shift * float(wrong), settings.max_shift) * (1 if positive else -1)
    return (1.0 / (1.0 + np.exp(-(logits + amount)))).astype(np.float32)


def refine_probabilities(
    probabilities: np.ndarray,
    image: np.ndarray | None = None,
    clicks: Sequence[Click] = (),
    scribbles: Sequence[Scribble] = (),
    spacing: Sequence[float] | None = None,
    settings: CorrectionSettings = DEFAULT_SETTINGS,
) -> np.ndarray:
    """(H, W) or (X, Y, Z) probabilities -> a corrected float32 copy. image: the query's intensities
    on the same grid ((H, W) or (H, W, C), channels averaged; None: no intensity term); clicks and
    scribbles as in the module docstring, applied in order; spacing: voxel sizes (default 1)."""
    result = np.array(probabilities, dtype=np.float32, copy=True)
    ndim = result.ndim
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == ndim + 1 and ndim == 2:
            image = image.mean(axis=-1)
        if image.shape != result.shape:
            raise InputError(
                "image", f"shape {image.shape} differs from the result's {result.shape}"
            )
        image = ndimage.gaussian_filter(image, SMOOTHING)
    sizes = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)[:ndim]
    for click in clicks:
        index, positive = click_index(click, ndim, result.shape)
        region = _click_region(result, image, index, positive, sizes, settings)
        if settings.shift:
            result = _shifted(result, index, positive, settings)
        _set(result, region, positive)
    for strokes, positive in scribbles:
        strokes = np.asarray(strokes) > 0
        if strokes.shape != result.shape:
            raise InputError(
                "scribbles", f"shape {strokes.shape} differs from the query's {result.shape}"
            )
        if not strokes.any():
            continue
        width = max(1, round(settings.scribble_width))
        near = ndimage.binary_dilation(strokes, iterations=width)
        _set(result, _similar_region(image, strokes, near, settings.tolerance), bool(positive))
    return result


def _set(probabilities: np.ndarray, region: np.ndarray, positive: bool) -> None:
    """Raise (positive) or lower the probabilities of `region` in place past the mask threshold."""
    if positive:
        probabilities[region] = np.maximum(probabilities[region], INSIDE)
    else:
        probabilities[region] = np.minimum(probabilities[region], OUTSIDE)


def parse_click(values: Sequence[str]) -> Click:
    """`--correct X Y [Z] +|-` values -> (x, y[, z], positive); InputError naming --correct."""
    shown = " ".join(values)
    if len(values) not in (3, 4) or values[-1] not in ("+", "-"):
        raise InputError("--correct", f"expects X Y [Z] then + or -, got '{shown}'")
    try:
        coordinates = [float(v) for v in values[:-1]]
    except ValueError:
        raise InputError("--correct", f"coordinates must be numbers, got '{shown}'") from None
    if not np.all(np.isfinite(coordinates)):
        raise InputError("--correct", f"coordinates must be finite, got '{shown}'")
    return (*coordinates, values[-1] == "+")


def parse_scribble(values: Sequence[str]) -> tuple[str, bool]:
    """`--correct-scribble MASKFILE +|-` values -> (path, positive); InputError naming the flag."""
    path, polarity = values
    if polarity not in ("+", "-"):
        raise InputError(
            "--correct-scribble", f"expects MASKFILE then + or -, got '{' '.join(values)}'"
        )
    return path, polarity == "+"


def read_scribble(
    path: str, shape: tuple[int, ...], affine: np.ndarray | None = None
) -> np.ndarray:
    """The strokes (bool, `shape`) of a scribble mask file (any non-zero value is a stroke) drawn
    on a query of `shape`: (H, W) for a 2D image, (X, Y, Z) stored voxels for a volume. affine:
    the query's voxel-to-world affine, which a NIfTI scribble's must match (None: not checked).
    InputError naming the file for an unreadable file, another shape or grid, or no stroke."""
    data = read_label(path)
    strokes = data.array
    if strokes.shape != tuple(shape):
        raise InputError(
            path, f"scribble of shape {strokes.shape} does not match the query's {tuple(shape)}"
        )
    if affine is not None and data.affine is not None:
        scale = float(np.abs(affine[:3]).max()) or 1.0
        if not np.allclose(data.affine, affine, atol=1e-3 * scale):
            raise InputError(
                path, "scribble's affine differs from the query's: draw it on the query's own grid"
            )
    if not strokes.any():
        raise InputError(path, "scribble holds no stroke (all voxels are 0)")
    return strokes > 0


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray | None:
    """Voxel sizes (3,) from a voxel-to-world affine (its columns' lengths); None without one."""
    if affine is None or not np.all(np.isfinite(affine)):
        return None
    sizes = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return sizes if np.all(sizes > 0) else None
