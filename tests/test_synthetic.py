"""Synthetic examples, tasks and the 3D phantom."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg.data.synthetic import (
    phantom_volume,
    render,
    sample_style,
    synthetic_example,
    synthetic_task,
)


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_example_shapes_and_ranges(channels: int) -> None:
    image, label = synthetic_example(np.random.default_rng(0), 64, channels)
    assert image.shape == (channels, 64, 64) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label.shape == (64, 64) and np.issubdtype(label.dtype, np.integer)
    assert len(np.unique(label)) >= 2


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_tasks_have_nonempty_masks_and_distractors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    task = synthetic_task(rng, 64, 6)
    assert task.images.shape == (6, 3, 64, 64) and task.images.dtype == np.float32
    assert task.masks.shape == (6, 64, 64) and task.masks.dtype == bool
    assert 0.0 <= task.images.min() and task.images.max() <= 1.0
    assert len(task.nonempty()) == 6 and task.group == "synthetic"
    style = sample_style(np.random.default_rng(seed))
    assert len(style.structures) >= 2  # at least one distractor besides the target
    _, labels = render(style, 4, 64, np.random.default_rng(seed))
    others = (labels > 0) & (labels != style.target + 1)
    assert others.flatten(1).any(dim=1).float().mean() >= 0.5  # distractors visible in most images


def test_synthetic_task_is_deterministic_and_scale_aware() -> None:
    a = synthetic_task(np.random.default_rng(7), 48, 3)
    b = synthetic_task(np.random.default_rng(7), 48, 3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    big = synthetic_task(np.random.default_rng(7), 160, 2)
    assert big.images.shape == (2, 3, 160, 160) and big.masks.any(axis=(1, 2)).all()


def test_target_contrasts_with_its_surroundings() -> None:
    gaps = []
    for seed in range(10):
        task = synthetic_task(np.random.default_rng(seed), 64, 4)
        inside = task.images.mean(1)[task.masks].mean()
        outside = task.images.mean(1)[~task.masks].mean()
        gaps.append(abs(inside - outside))
    assert np.median(gaps) > 0.05


def test_phantom_volume_label_on_middle_slices() -> None:
    volume, label = phantom_volume(np.random.default_rng(0), (24, 64, 64))
    assert volume.shape == label.shape == (24, 64, 64)
    assert volume.dtype == np.float32 and label.dtype == np.uint8
    assert 0.0 <= volume.min() and volume.max() <= 1.0
    present = (label > 0).reshape(24, -1).any(axis=1)
    assert present[9:15].all() and not present[0] and not present[-1]
    assert set(np.unique(label)) == {0, 1, 2}
    areas = (label > 0).reshape(24, -1).sum(axis=1).astype(float)
    middle = areas[9:15]
    assert np.abs(np.diff(middle)).max() < 0.5 * middle.max()  # changes smoothly across slices


def test_volume_task_holds_slices_with_and_without_the_target() -> None:
    from promptseg.data.synthetic import synthetic_volume_task

    task = synthetic_volume_task(np.random.default_rng(4), resolution=32, depth=16)
    assert task.images.shape == (16, 3, 32, 32) and task.masks.shape == (16, 32, 32)
    present = task.masks.reshape(16, -1).any(axis=1)
    assert present.any() and not present.all()
