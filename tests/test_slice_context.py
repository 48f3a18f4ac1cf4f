"""Through-plane consistency of slice-by-slice volumes (issue 18 item 2, inference side)."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import tiny_checkpoint  # noqa: F401 (fixture)

from promptseg.data.synthetic import phantom_volume
from promptseg.engine.segmenter import Segmenter
from promptseg.engine.slice_context import (
    consistent_slices,
    dominant_components,
    smooth_through_plane,
)


def ball_probabilities() -> np.ndarray:
    """(20, 24, 24) probabilities: a confident ball on slices 5..14 with slice 9 dropped to 0.3, and
    a
    small confident blob on slice 18, far from the ball."""
    z, y, x = np.mgrid[:20, :24, :24]
    ball = (z - 9.5) ** 2 / 25 + ((y - 12) ** 2 + (x - 12) ** 2) / 36 <= 1
    p = np.where(ball, 0.9, 0.05).astype(np.float32)
    p[9][ball[9]] = 0.3
    p[18, 2:5, 2:5] = 0.95
    return p


def test_a_flicker_is_filled_and_a_blob_apart_is_dropped() -> None:
    p = ball_probabilities()
    assert not (p[9] > 0.5).any() and (p[18] > 0.5).any()
    out = consistent_slices(p)
    assert out.shape == p.shape and out.dtype == np.float32
    assert (out[9] > 0.5).sum() > 0.8 * (
        p[8] > 0.5
    ).sum()  # the dropped slice agrees with its neighbours
    assert not (out[18] > 0.5).any()  # the blob apart from the ball is gone
    assert np.all((out >= 0) & (out <= 1))


def test_each_step_alone() -> None:
    p = ball_probabilities()
    np.testing.assert_allclose(smooth_through_plane(p, 0.0), p)
    assert not (consistent_slices(p, sigma=0.0)[18] > 0.5).any()  # components alone
    assert (consistent_slices(p, min_fraction=0.0)[9] > 0.5).any()  # smoothing alone
    mask = p > 0.5
    kept = dominant_components(mask, 0.5)
    assert kept.sum() < mask.sum() and not kept[18].any()
    assert not dominant_components(np.zeros((3, 4, 4), dtype=bool), 0.5).any()


def test_two_parts_of_similar_size_are_both_kept() -> None:
    p = np.full((10, 20, 20), 0.05, dtype=np.float32)
    p[2:8, 2:7, 2:7] = 0.9
    p[2:8, 12:18, 12:18] = 0.9  # a second part, a little larger (e.g. the other kidney)
    out = consistent_slices(p)
    assert (out[4, 4, 4] > 0.5) and (out[4, 14, 14] > 0.5)


def test_consistency_in_segment_volume(tiny_checkpoint: Path) -> None:
    volume, labels = phantom_volume(np.random.default_rng(0), (16, 32, 32))
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    prompts = segmenter.encode_volume_prompts(volume, labels, slices=3, axis=0)
    plain = segmenter.segment_volume(volume, prompts, axis=0)
    consistent = segmenter.segment_volume(volume, prompts, axis=0, consistency=True)
    assert consistent.probabilities.shape == volume.shape
    np.testing.assert_allclose(
        consistent.probabilities, consistent_slices(plain.probabilities), atol=1e-6
    )


def test_plane_prompts_average_the_three_axes(tiny_checkpoint: Path) -> None:
    volume, labels = phantom_volume(np.random.default_rng(1), (16, 24, 20))
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    planes = segmenter.encode_volume_prompts(volume, labels, label=1, slices=3, axis=(0, 1, 2))
    assert planes.axes == (0, 1, 2) and planes.num_prompts == 3
    fused = segmenter.segment_volume(volume, planes).probabilities
    each = [
        segmenter.segment_volume(volume, planes.per_axis[a], axis=a).probabilities
        for a in (0, 1, 2)
    ]
    np.testing.assert_allclose(fused, np.mean(each, axis=0), atol=1e-6)
    labels_result = segmenter.segment_volume_labels(volume, {1: planes}, consistency=True)
    assert labels_result.probabilities.shape == (1, *volume.shape)
