"""Task and per-image augmentation: shapes, ranges, identical treatment of an episode,
involutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptseg.data.augment import (
    TASK_AUGMENTATION_PROBS,
    TaskAugmentation,
    augment_example,
    augment_examples,
    boundary,
)


def _episode(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((n, 3, size, size), generator=gen)
    masks = torch.zeros(n, size, size)
    masks[:, 16:40, 20:44] = 1.0
    return images, masks


@pytest.mark.parametrize("name", sorted(TASK_AUGMENTATION_PROBS))
def test_each_task_op_is_identical_across_the_episode(name: str) -> None:
    images, masks = _episode()
    images[1], masks[1] = images[0], masks[0]  # two copies of one example in the episode
    aug = TaskAugmentation({k: float(k == name) for k in TASK_AUGMENTATION_PROBS})
    ops = aug.sample(np.random.default_rng(3))
    assert [op for op, _ in ops] == [name]
    out_images, out_masks = aug.apply(images, masks, ops)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert out_images.dtype == torch.float32 and 0.0 <= out_images.min() and out_images.max() <= 1.0
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_images[0], out_images[1]) and torch.equal(out_masks[0], out_masks[1])
    again = aug.apply(images, masks, ops)
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)


def test_all_ops_together_keep_shapes_and_ranges() -> None:
    images, masks = _episode()
    aug = TaskAugmentation({k: 1.0 for k in TASK_AUGMENTATION_PROBS})
    ops = aug.sample(np.random.default_rng(0))
    assert sum(op in ("flip_labels", "sobel_edge") for op, _ in ops) == 1
    out_images, out_masks = aug.apply(images, masks, ops)
    assert out_images.shape == images.shape and 0.0 <= out_images.min() and out_images.max() <= 1.0
    assert out_masks.shape == masks.shape


@pytest.mark.parametrize("name", ["hflip", "vflip", "flip_labels", "flip_intensity"])
def test_flips_are_involutions(name: str) -> None:
    images, masks = _episode()
    aug = TaskAugmentation()
    ops = [(name, {})]
    once = aug.apply(images, masks, ops)
    twice = aug.apply(*once, ops)
    assert torch.allclose(twice[0], images, atol=1e-6) and torch.equal(twice[1], masks)
    assert not torch.equal(once[0], images) or not torch.equal(once[1], masks)


def test_sobel_edge_label_is_a_thin_nonempty_boundary() -> None:
    _, masks = _episode()
    masks[2] = 0.0
    masks[2, 30, 30] = 1.0  # single pixel
    masks[3] = 1.0  # full image
    edges = boundary(masks)
    assert all(edges[i].sum() > 0 for i in range(4))
    assert edges[0].sum() < masks[0].sum()
    assert edges[0][28, 32] == 0  # the interior is not boundary


def test_per_image_augmentation_shapes_ranges_and_independence() -> None:
    images, masks = _episode(8)
    images[:] = images[0]
    masks[:] = masks[0]
    out_images, out_masks = augment_examples(images, masks, np.random.default_rng(1), p=1.0)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert 0.0 <= out_images.min() and out_images.max() <= 1.0
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_images[0], out_images[1])  # independent parameters per image
    assert (out_masks.flatten(1).sum(1) > 0).all()
    image, mask = augment_example(images[0], masks[0], np.random.default_rng(2))
    assert image.shape == images[0].shape and mask.shape == masks[0].shape


def test_unknown_op_is_rejected() -> None:
    with pytest.raises(ValueError):
        TaskAugmentation({"rotate_colors": 1.0})
