"""Baselines, model predictor and the evaluation report on small synthetic tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptseg.data.episodes import Episode, fixed_episodes
from promptseg.data.synthetic import synthetic_task
from promptseg.data.tasks import ArrayTask
from promptseg.eval import (
    EvalReport,
    FineTunedUNetBaseline,
    ModelPredictor,
    NearestPromptBaseline,
    evaluate,
)
from promptseg.metrics import episode_dice
from promptseg.model import ModelConfig, PromptSegNet


def square_task(count: int, resolution: int, seed: int = 0, name: str = "squares") -> ArrayTask:
    """Bright squares (side R/6-R/3) on a dark noisy background; mask = the square."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.2, (count, 3, resolution, resolution)).astype(np.float32)
    masks = np.zeros((count, resolution, resolution), dtype=bool)
    for i in range(count):
        side = int(rng.integers(resolution // 6, resolution // 3))
        x, y = rng.integers(0, resolution - side, 2)
        images[i, :, y : y + side, x : x + side] += 0.7
        masks[i, y : y + side, x : x + side] = True
    return ArrayTask(name, "squares", images, masks)


@pytest.fixture(scope="module")
def synthetic() -> ArrayTask:
    return synthetic_task(np.random.default_rng(3), 32, 8)


class Recorder:
    """A predictor that remembers the episodes it saw and predicts all-foreground."""

    def __init__(self) -> None:
        self.seen: list[Episode] = []

    def predict(self, episode: Episode) -> torch.Tensor:
        self.seen.append(episode)
        return torch.ones_like(episode.query_masks)


def test_nearest_prompt_copies_mask_of_identical_prompt(synthetic: ArrayTask) -> None:
    episode = fixed_episodes(synthetic, shots=4, queries=2, count=1, seed=0)[0]
    episode.query_images = episode.prompt_images[[2, 0]].clone()
    probs = NearestPromptBaseline().predict(episode)
    assert probs.shape == (2, 32, 32)
    assert torch.equal(probs, episode.prompt_maps[[2, 0]])


def test_nearest_prompt_ignores_brightness_and_contrast(synthetic: ArrayTask) -> None:
    episode = fixed_episodes(synthetic, shots=3, queries=1, count=1, seed=1)[0]
    episode.query_images = 0.5 * episode.prompt_images[1:2] + 0.2
    assert torch.equal(NearestPromptBaseline().predict(episode), episode.prompt_maps[1:2])


def test_unet_baseline_learns_easy_task_deterministically() -> None:
    task = square_task(8, 48)
    episode = fixed_episodes(task, shots=4, queries=4, count=1, seed=0)[0]
    baseline = FineTunedUNetBaseline(steps=60, seed=0)
    probs = baseline.predict(episode)
    assert probs.shape == (4, 48, 48) and 0.0 <= probs.min() and probs.max() <= 1.0
    assert episode_dice(probs, episode.query_masks) > 80.0
    state = torch.random.get_rng_state()
    again = FineTunedUNetBaseline(steps=60, seed=0).predict(episode)
    assert torch.equal(probs, again)
    assert torch.equal(state, torch.random.get_rng_state())


def test_unet_baseline_downsamples_and_restores_resolution() -> None:
    task = square_task(3, 40)
    episode = fixed_episodes(task, shots=1, queries=2, count=1, seed=0)[0]
    baseline = FineTunedUNetBaseline(steps=2, resolution=16)
    assert baseline.working_size(40) == 16 and baseline.working_size(10) == 8
    assert baseline.predict(episode).shape == (2, 40, 40)


def test_model_predictor_shapes_and_probabilities() -> None:
    torch.manual_seed(0)
    model = PromptSegNet(
        ModelConfig(
            resolution=32, widths=(8, 16, 32), attention_stages=(2,), attention_depth=1, head_dim=16
        )
    )
    task = square_task(5, 64)
    episode = fixed_episodes(task, shots=2, queries=3, count=1, seed=0)[0]
    probs = ModelPredictor(model).predict(episode)
    assert probs.shape == (3, 64, 64) and probs.dtype == torch.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0


def test_evaluate_gives_identical_episodes_and_reports(synthetic: ArrayTask, tmp_path) -> None:
    tiny = ArrayTask("tiny", "small", synthetic.images[:3], synthetic.masks[:3])
    first, second = Recorder(), Recorder()
    report = evaluate(
        {"first": first, "nearest": NearestPromptBaseline(), "second": second},
        [synthetic, tiny],
        shots=(1, 4),
        episodes=3,
        queries=2,
        progress=False,
    )
    assert len(first.seen) == len(second.seen) == 3 * 3  # synthetic at K=1 and 4, tiny at K=1
    for a, b in zip(first.seen, second.seen):
        assert a is b
    assert report.skipped == [
        {
            "group": "small",
            "task": "tiny",
            "shots": 4,
            "reason": "3 non-empty examples, need at least 5",
        }
    ]

    data = report.to_json()
    assert data["settings"]["episodes"] == 3 and data["settings"]["shots"] == [1, 4]
    assert set(data["methods"]) == {"first", "nearest", "second"}
    rows = {row["task"]: row for row in data["methods"]["nearest"]["tasks"]}
    assert set(rows["synthetic"]["shots"]) == {"1", "4"} and set(rows["tiny"]["shots"]) == {"1"}
    cell = rows["synthetic"]["shots"]["4"]
    assert cell["episodes"] == 3 and len(cell["dice"]) == 3
    assert cell["mean"] == pytest.approx(np.mean(cell["dice"])) and cell["std"] == pytest.approx(
        np.std(cell["dice"], ddof=1)
    )
    assert all(0.0 <= d <= 100.0 for d in cell["dice"])
    summary = data["methods"]["first"]["mean_over_tasks"]
    assert summary["1"]["tasks"] == 2 and summary["4"]["tasks"] == 1
    assert data["methods"]["first"]["tasks"] == data["methods"]["second"]["tasks"]

    text = report.to_markdown()
    assert "| method | K=1 | K=4 |" in text and "tiny K=4" in text and "| tiny | " in text

    path = tmp_path / "out" / "report.json"
    report.write(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    assert isinstance(report, EvalReport)


def test_episode_dice_conventions() -> None:
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1
    probs = masks.clone()
    probs[1] = 0.2  # empty prediction on an empty mask counts as 100
    assert episode_dice(probs, masks) == pytest.approx(100.0)
    assert episode_dice(torch.ones(2, 4, 4), masks) == pytest.approx(50.0 * (2 * 8 / 24))
    with pytest.raises(ValueError):
        episode_dice(torch.ones(1, 4, 4), masks)


def test_merging_reports_unions_methods_and_tasks() -> None:
    from promptseg.errors import InputError
    from promptseg.eval.evaluate import CellScore, EvalReport

    settings = {"episodes": 1, "queries": 1, "seed": 0, "shots": [1]}

    def report(method: str, task: str, dice: float) -> EvalReport:
        return EvalReport(
            [method],
            [1],
            [("g", task)],
            dict(settings),
            {method: {("g", task): {1: CellScore([dice])}}},
            {method: 1.0},
        )

    merged = report("a", "t1", 10.0).merged(report("b", "t1", 20.0)).merged(report("b", "t2", 30.0))
    assert merged.methods == ["a", "b"] and merged.tasks == [("g", "t1"), ("g", "t2")]
    assert merged.scores["b"][("g", "t2")][1].dice == [30.0] and merged.seconds["b"] == 2.0
    assert merged.mean_over_tasks("b", 1)[0] == 25.0
    with pytest.raises(InputError, match="x.json: scores a on t1 again"):
        merged.merged(report("a", "t1", 10.0), "x.json")
    other = report("c", "t1", 1.0)
    other.settings["seed"] = 3
    with pytest.raises(InputError, match="y.json: was evaluated with seed=3"):
        merged.merged(other, "y.json")
    assert EvalReport.from_json(merged.to_json()).scores == merged.scores
