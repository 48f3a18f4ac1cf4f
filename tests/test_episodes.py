"""Sparse prompts, the episodic sampler and fixed evaluation episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from promptseg.data.episodes import EpisodeSampler, fixed_episodes
from promptseg.data.prompts import (
    SPARSE_KINDS,
    box_from_mask,
    click_from_mask,
    rasterize_box,
    rasterize_clicks,
    sparse_prompt_map,
)
from promptseg.data.tasks import ArrayTask
from promptseg.model.prompt_types import PROMPT_TYPES


def _task(
    name: str, group: str, n: int = 10, size: int = 32, empty: int = 2, channels: int = 1
) -> ArrayTask:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - empty):
        masks[i, 4 + i % 8 : 20 + i % 8, 6:24] = True
    return ArrayTask(name, group, images, masks)


# -- sparse prompts ------------------------------------------------------------------------------


def test_rasterizers() -> None:
    clicks = rasterize_clicks([(5.0, 7.0), (20.0, 3.0)], (16, 32), radius=2)
    assert (
        clicks.shape == (16, 32) and clicks[7, 5] == 1 and clicks[3, 20] == 1 and clicks[15, 0] == 0
    )
    assert rasterize_clicks([], (8, 8)).sum() == 0
    box = rasterize_box((2, 3, 5, 4), (10, 10))
    assert box.sum() == 4 * 2 and box[3, 2] == 1 and box[4, 5] == 1
    assert rasterize_box((-5, -5, 100, 2), (10, 10)).sum() == 10 * 3


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (128, 128)])
@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_sparse_maps_lie_inside_or_near_the_mask(kind: str, size: tuple[int, int]) -> None:
    mask = np.zeros(size, dtype=bool)
    h, w = size
    mask[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = True
    near = ndimage.binary_dilation(mask, iterations=max(3, min(size) // 16))
    for seed in range(5):
        prompt = sparse_prompt_map(mask, kind, np.random.default_rng(seed))
        assert prompt.shape == size and prompt.dtype == torch.float32 and prompt.sum() > 0
        drawn = prompt.numpy().astype(bool)
        if kind == "box":  # a jittered bounding box: roughly the mask's extent
            assert (drawn & mask).sum() >= 0.7 * mask.sum() and (
                drawn & mask
            ).sum() >= 0.6 * drawn.sum()
        else:
            assert not (drawn & ~near).any() and (drawn & mask).sum() >= 0.8 * drawn.sum()
    assert sparse_prompt_map(np.zeros(size), kind, np.random.default_rng(0)).sum() == 0


def test_click_is_deep_inside_and_box_matches_bounds() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:50, 20:40] = True
    x, y = click_from_mask(mask, np.random.default_rng(0))
    assert mask[int(y), int(x)] and 22 <= x <= 37
    x0, y0, x1, y1 = box_from_mask(mask, np.random.default_rng(0), jitter=0.0)
    assert (x0, y0, x1, y1) == (20, 10, 39, 49)
    assert click_from_mask(np.zeros((8, 8)), np.random.default_rng(0)) is None


# -- sampler ---------------------------------------------------------------------------------------

TASKS = [_task("a1", "A"), _task("a2", "A"), _task("a3", "A"), _task("b1", "B", n=5, empty=1)]


def test_batch_shapes_dtypes_and_ranges() -> None:
    sampler = EpisodeSampler(TASKS, 32, shots=(2, 6), queries=3, synthetic_fraction=0.3, seed=1)
    batch = sampler.sample_batch(0, 5)
    e, k = batch.prompt_images.shape[:2]
    assert e == 5 and 2 <= k <= 6 and len(batch.tasks) == 5
    assert batch.prompt_images.shape == (5, k, 3, 32, 32) and batch.prompt_maps.shape == (
        5,
        k,
        32,
        32,
    )
    assert batch.prompt_types.shape == (5, k) and batch.prompt_types.dtype == torch.int64
    assert batch.query_images.shape == (5, 3, 3, 32, 32) and batch.query_masks.shape == (
        5,
        3,
        32,
        32,
    )
    for images in (batch.prompt_images, batch.query_images):
        assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
    assert set(batch.query_masks.unique().tolist()) <= {0.0, 1.0}


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    def make() -> EpisodeSampler:
        return EpisodeSampler(
            TASKS, 32, shots=(1, 8), synthetic_fraction=0.3, sparse_fraction=0.5, seed=4
        )

    first, second = make().sample_batch(7, 4), make().sample_batch(7, 4)
    for field in ("prompt_images", "prompt_maps", "prompt_types", "query_images", "query_masks"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert first.tasks == second.tasks
    other = make().sample_batch(8, 4)
    assert other.prompt_images.shape != first.prompt_images.shape or not torch.equal(
        other.prompt_images, first.prompt_images
    )


def test_groups_are_balanced() -> None:
    sampler = EpisodeSampler(
        TASKS,
        32,
        shots=(1, 1),
        queries=1,
        synthetic_fraction=0.0,
        task_augment=False,
        image_augment=False,
        seed=0,
    )
    names = [t for step in range(60) for t in sampler.sample_batch(step, 4).tasks]
    from_b = sum(name == "b1" for name in names) / len(names)
    assert 0.4 < from_b < 0.6  # group B has one task out of four but gets half the episodes


def test_only_synthetic_without_tasks_and_sparse_types() -> None:
    sampler = EpisodeSampler([], 32, shots=(2, 2), queries=2, sparse_fraction=1.0, seed=0)
    batch = sampler.sample_batch(0, 2)
    assert batch.tasks == ["synthetic", "synthetic"]
    sparse = {PROMPT_TYPES[k] for k in SPARSE_KINDS}
    assert set(batch.prompt_types.unique().tolist()) <= sparse


def test_prompts_and_queries_are_distinct_examples() -> None:
    images = (
        np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1).repeat(8, axis=2).repeat(8, axis=3)
        / 11
    )
    masks = np.ones((12, 8, 8), dtype=bool)
    task = ArrayTask("ids", "ids", np.repeat(images, 3, axis=1), masks)
    sampler = EpisodeSampler(
        [task],
        8,
        shots=(8, 8),
        queries=4,
        synthetic_fraction=0.0,
        task_augment=False,
        image_augment=False,
    )
    batch = sampler.sample_batch(0, 3)
    for e in range(3):
        ids = torch.cat([batch.prompt_images[e, :, 0, 0, 0], batch.query_images[e, :, 0, 0, 0]])
        assert len(set(torch.round(ids * 11).tolist())) == 12


def test_fixed_episodes_are_deterministic_and_disjoint() -> None:
    task = _task("eval", "E", n=12, empty=2, channels=3)
    first = fixed_episodes(task, shots=3, queries=2, count=4, seed=0)
    second = fixed_episodes(task, shots=3, queries=2, count=4, seed=0)
    seen = []
    for a, b in zip(first, second):
        assert torch.equal(a.prompt_images, b.prompt_images) and torch.equal(
            a.query_masks, b.query_masks
        )
        assert a.prompt_images.shape == (3, 3, 32, 32) and a.query_images.shape == (2, 3, 32, 32)
        assert (a.prompt_types == PROMPT_TYPES["mask"]).all()
        assert (a.prompt_maps.flatten(1).sum(1) > 0).all() and (
            a.query_masks.flatten(1).sum(1) > 0
        ).all()
        for query in a.query_images:
            assert not any(torch.equal(query, prompt) for prompt in a.prompt_images)
        seen.extend(q for q in a.query_images)
    distinct = {tuple(q.flatten()[:16].tolist()) for q in seen}
    assert len(distinct) == 8  # 4 episodes x 2 queries cover different examples
    with pytest.raises(ValueError):
        fixed_episodes(_task("tiny", "T", n=3, empty=2), 1, 1, 1, 0)
