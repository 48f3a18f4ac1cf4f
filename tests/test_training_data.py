"""Training data: the packed dataset cache, the fixed case split, balanced and hardness-weighted
task draws, batches built in worker processes, self-queried sparse episodes and sparse evaluation
episodes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import disk_example, tiny_checkpoint, write_png  # noqa: F401  (pytest fixture)

from promptseg.cli import main
from promptseg.data.episodes import EpisodeSampler, base_task_weights, fixed_episodes, load_examples
from promptseg.data.index import build_tasks, held_cases
from promptseg.data.packed import find_packs
from promptseg.data.tasks import ArrayTask
from promptseg.train.prefetch import StepBatches, step_batches
from promptseg.train.task_balance import TaskHardness


def disk_dataset(root: Path, name: str, cases: int, rgb: bool = False) -> Path:
    """A simple-layout dataset of `cases` noisy disks (grey, or RGB with unequal channels)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(len(name))
    for index in range(cases):
        image, mask = disk_example(rng, (40, 48))
        if rgb:
            image = np.stack([image, 255 - image, image // 2], axis=-1)
        write_png(root / "images" / f"case{index:02d}.png", image)
        write_png(root / "labels" / f"case{index:02d}.png", mask)
    (root / "dataset.json").write_text(
        json.dumps({"name": name, "labels": {"background": 0, "disk": 1}})
    )
    return root


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    disk_dataset(folder / "grey", "grey", 10)
    disk_dataset(folder / "colour", "colour", 6, rgb=True)
    return folder


def test_pack_round_trip_matches_the_decoded_data(tmp_path: Path, datasets: Path) -> None:
    cache = tmp_path / "cache"
    decoded = build_tasks([datasets], 32)
    packed_first = build_tasks([datasets], 32, cache_dir=cache)
    packed_again = build_tasks([datasets], 32, cache_dir=cache)
    assert [p.name for p in find_packs(cache)] == ["colour-r32-a2-c3", "grey-r32-a2-c3"]
    grey_pack = np.load(cache / "grey-r32-a2-c3" / "images.npy", mmap_mode="r")
    assert grey_pack.shape[1] == 1  # grey data stored with one channel
    assert isinstance(packed_again[1].images, np.memmap)
    for plain, first, again in zip(decoded, packed_first, packed_again):
        assert plain.name == first.name == again.name
        np.testing.assert_array_equal(plain.masks, again.masks)
        images = np.broadcast_to(again.images, plain.images.shape)
        np.testing.assert_array_equal(plain.images, images)
        np.testing.assert_array_equal(plain.case_ids, again.case_ids)
    # Episodes see three channels either way.
    episode = fixed_episodes(packed_again[1], shots=2, queries=2, count=1, seed=0)[0]
    assert episode.prompt_images.shape == (2, 3, 32, 32)


def test_pack_is_rebuilt_when_a_source_file_changes_and_usable_without_the_source(
    tmp_path: Path, datasets: Path
) -> None:
    cache = tmp_path / "cache"
    build_tasks([datasets / "grey"], 32, cache_dir=cache)
    label = datasets / "grey" / "labels" / "case00.png"
    write_png(label, np.zeros((40, 48), np.uint8))
    os.utime(label, ns=(1, 1))
    rebuilt = build_tasks([datasets / "grey"], 32, cache_dir=cache)[0]
    assert not rebuilt.masks[0].any()
    # The pack folder alone (e.g. carried to another machine) is a training source.
    from_pack = build_tasks([cache], 32)
    np.testing.assert_array_equal(from_pack[0].masks, rebuilt.masks)
    with pytest.raises(Exception, match="another resolution"):
        build_tasks([cache], 64)


def test_case_split_is_disjoint_complete_and_stable(datasets: Path) -> None:
    everything = build_tasks([datasets], 32)
    train = build_tasks([datasets], 32, cases="train", held_fraction=0.3, min_examples=1)
    held = build_tasks([datasets], 32, cases="held", held_fraction=0.3, min_examples=1)
    for whole in everything:
        parts = [t for t in train + held if t.name == whole.name]
        ids = [set(t.case_ids.tolist()) for t in parts]
        assert len(ids) == 2 and not ids[0] & ids[1]
        assert ids[0] | ids[1] == set(whole.case_ids.tolist())
    ids = np.array([f"case{i}" for i in range(200)])
    split = held_cases("any", ids, 0.2)
    assert 20 <= split.sum() <= 60
    np.testing.assert_array_equal(split, held_cases("any", ids, 0.2))
    np.testing.assert_array_equal(
        split[:50], held_cases("any", ids[:50], 0.2)
    )  # independent of other cases


def test_held_queries_are_prompted_from_training_cases(datasets: Path) -> None:
    """cases="held-queries": every case is kept, episodes query only held cases and prompt only
    from training cases."""
    tasks = build_tasks([datasets], 32, cases="held-queries", held_fraction=0.3, min_examples=1)
    assert tasks
    for task in tasks:
        held = held_cases(task.group, task.case_ids, 0.3)
        np.testing.assert_array_equal(task.query_examples, held)
        held_images = load_examples(task, np.flatnonzero(held), 32, 3)[0]
        train_images = load_examples(task, np.flatnonzero(~held), 32, 3)[0]

        def among(image: torch.Tensor, pool: torch.Tensor) -> bool:
            return bool((pool - image).abs().flatten(1).amax(dim=1).eq(0).any())

        for episode in fixed_episodes(task, shots=3, queries=2, count=3, seed=0):
            assert all(
                among(image, held_images) and not among(image, train_images)
                for image in episode.query_images
            )
            assert all(
                among(image, train_images) and not among(image, held_images)
                for image in episode.prompt_images
            )


def test_base_weights_balance_datasets_then_labels() -> None:
    image = np.zeros((4, 1, 8, 8), np.uint8)
    masks = np.ones((4, 8, 8), bool)
    tasks = [ArrayTask(f"a/{i}", "a", image, masks) for i in range(4)] + [
        ArrayTask("b/0", "b", image, masks)
    ]
    np.testing.assert_allclose(base_task_weights(tasks), [0.125] * 4 + [0.5])


def test_hardness_weights_draw_harder_tasks_more_often() -> None:
    hardness = TaskHardness(decay=0.5)
    hardness.update(["easy", "hard"], [0.2, 1.0])
    weights = hardness.weights(["easy", "hard", "unseen"], np.full(3, 1 / 3), mix=0.5)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1] > weights[2] > weights[0]
    clone = TaskHardness()
    clone.load_state(hardness.state())
    np.testing.assert_allclose(
        clone.weights(["easy", "hard"], np.full(2, 0.5), 0.5),
        hardness.weights(["easy", "hard"], np.full(2, 0.5), 0.5),
    )


def test_sampler_follows_task_weights_and_refuses_bad_ones() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 1, 16, 16), dtype=np.uint8)
    masks = np.zeros((6, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    tasks = [ArrayTask("a/x", "a", images, masks), ArrayTask("b/y", "b", images, masks)]
    sampler = EpisodeSampler(
        tasks,
        resolution=16,
        shots=(1, 1),
        queries=1,
        synthetic_fraction=0.0,
        task_augment=False,
        image_augment=False,
        sparse_fraction=0.0,
    )
    sampler.set_task_weights(np.array([0.0, 1.0]))
    assert {name for step in range(10) for name in sampler.sample_batch(step, 2).tasks} == {"b/y"}
    with pytest.raises(ValueError, match="task weights"):
        sampler.set_task_weights(np.array([1.0, np.nan]))


def test_worker_batches_equal_in_process_batches() -> None:
    sampler = EpisodeSampler([], resolution=32, shots=(1, 3), queries=2, seed=3)
    batches = StepBatches(sampler, episodes=2)
    here = list(step_batches(batches, 5, 9, workers=0))
    there = list(step_batches(batches, 5, 9, workers=1))
    assert len(here) == len(there) == 4
    for a, b in zip(here, there):
        assert a.tasks == b.tasks
        torch.testing.assert_close(a.prompt_maps, b.prompt_maps, rtol=0, atol=0)
        torch.testing.assert_close(a.query_images, b.query_images, rtol=0, atol=0)


def test_self_queried_sparse_episode_queries_its_prompt_image() -> None:
    sampler = EpisodeSampler(
        [],
        resolution=32,
        shots=(1, 1),
        queries=2,
        synthetic_fraction=1.0,
        sparse_fraction=1.0,
        self_query_fraction=1.0,
        task_augment=False,
        image_augment=False,
    )
    batch = sampler.sample_batch(0, 3)
    torch.testing.assert_close(batch.query_images[:, 0], batch.prompt_images[:, 0], rtol=0, atol=0)
    assert (batch.prompt_types > 1).all()  # click, box or scribble


@pytest.mark.parametrize("kind", ["click", "box", "scribble"])
def test_sparse_evaluation_episodes(kind: str, datasets: Path) -> None:
    task = build_tasks([datasets / "grey"], 32)[0]
    first = fixed_episodes(
        task, shots=1, queries=2, count=3, seed=0, prompt_kind=kind, query_prompts=True
    )
    again = fixed_episodes(
        task, shots=1, queries=2, count=3, seed=0, prompt_kind=kind, query_prompts=True
    )
    for episode, same in zip(first, again):
        torch.testing.assert_close(episode.query_images, episode.prompt_images, rtol=0, atol=0)
        torch.testing.assert_close(episode.prompt_maps, same.prompt_maps, rtol=0, atol=0)
        inside = episode.prompt_maps.bool() & ~episode.query_masks.bool()
        if kind != "box":  # clicks and scribbles stay inside the mask
            assert not inside.any()
        assert episode.prompt_maps.sum() < episode.query_masks.sum() or kind == "box"


def test_eval_cli_scores_clicks_on_the_prompted_image(
    tmp_path: Path, datasets: Path, tiny_checkpoint: Path, capsys
) -> None:  # noqa: F811
    out = tmp_path / "clicks.json"
    code = main(
        [
            "eval",
            "--data",
            str(datasets / "grey"),
            "--shots",
            "1",
            "--episodes",
            "2",
            "--prompt-kind",
            "click",
            "--query-prompts",
            "--methods",
            "promptseg",
            "nearest_prompt",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert (
        report["settings"]["prompt_kind"] == "click" and report["settings"]["query_prompts"] is True
    )
    assert "click prompts" in capsys.readouterr().out
