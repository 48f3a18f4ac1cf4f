"""The ensemble's leave-one-out shift moves the mask threshold, not the probabilities (issue 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, tiny_checkpoint, write_png  # noqa: F401  (fixture)
from PIL import Image

import promptseg.engine.ensemble as ensemble_module
from promptseg import Segmenter
from promptseg.cli import main
from promptseg.data.episodes import Episode, fixed_episodes
from promptseg.data.synthetic import synthetic_task
from promptseg.engine.backends import create_backend
from promptseg.engine.ensemble import (
    TEMPERATURE_GRID,
    Ensemble,
    Member,
    build_ensemble,
    calibration_temperature,
    decision_threshold,
    flipped,
    plan_members,
)
from promptseg.engine.segmenter import LabelResult, VolumeResult
from promptseg.eval.baselines import ModelPredictor
from promptseg.eval.evaluate import evaluate
from promptseg.eval.prediction import Prediction
from promptseg.model import PromptSegNet


@pytest.fixture
def model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY_CONFIG).eval()


def pairs(count: int, size: tuple[int, int] = (40, 36)) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [disk_example(rng, size) for _ in range(count)]


def test_decision_threshold_is_the_shifted_logit_threshold() -> None:
    p = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    logits = torch.log(p) - torch.log1p(-p)
    for threshold in (0.5, 0.3, 0.8):
        for shift in (-2.5, 0.0, 1.75):
            cut = decision_threshold(threshold, shift)
            expected = logits + shift > np.log(threshold / (1 - threshold))
            assert torch.equal(p > cut, expected), (threshold, shift)
    assert decision_threshold(0.5, 0.0) == 0.5 and decision_threshold(0.5, 2.0) < 0.5


def test_label_results_threshold_each_label_at_its_shift() -> None:
    probabilities = np.array([[0.3, 0.6, 0.1], [0.2, 0.55, 0.45]], np.float32)  # (L=2, 3 pixels)
    plain = LabelResult((1, 2), probabilities, 0.5)
    assert plain.masks.tolist() == [[False, True, False], [False, True, False]]
    assert plain.label_map.tolist() == [0, 1, 0]
    shifted = LabelResult(
        (1, 2), probabilities, 0.5, shifts=(1.0, 0.0)
    )  # label 1: logit(0.3) + 1 > 0
    assert shifted.masks.tolist() == [[True, True, False], [False, True, False]]
    assert shifted.label_map.tolist() == [1, 1, 0]
    raised = LabelResult(
        (1, 2), probabilities, 0.5, shifts=(0.0, 2.0)
    )  # label 2 wins pixel 1 by its score
    assert raised.label_map.tolist() == [2, 2, 2]
    volume = VolumeResult(np.array([0.3, 0.6], np.float32), None, 2, shift=1.0)
    assert volume.mask.tolist() == [True, True]


def test_members_are_unshifted_and_no_shift_decodes_no_held_out_prompt(
    model: PromptSegNet, monkeypatch
) -> None:
    rng = np.random.default_rng(0)
    examples = [disk_example(rng, (32, 32)) for _ in range(4)]
    images = torch.stack(
        [torch.from_numpy(i).float().div(255).expand(3, -1, -1) for i, _ in examples]
    )
    maps = torch.stack([torch.from_numpy(m > 0).float() for _, m in examples])
    types = torch.ones(4, dtype=torch.long)
    backend = create_backend("torch", model, "cpu")

    def encode(flip: tuple[int, ...], keep: tuple[int, ...]):
        return backend.encode(
            flipped(images[None, list(keep)], flip),
            flipped(maps[None, list(keep)], flip),
            types[None, list(keep)],
        )

    members = plan_members(4, 4)
    monkeypatch.setattr(ensemble_module, "calibration_bias", lambda logits, masks: 1.5)
    monkeypatch.setattr(ensemble_module, "calibration_temperature", lambda logits, masks: 1.0)
    shifted = build_ensemble(backend, images[None], maps[None], types[None], members, encode)
    assert shifted.bias == 1.5

    def refuse(*args):
        raise AssertionError("held-out prompts decoded without a shift")

    monkeypatch.setattr(backend, "decode_each", refuse)
    unshifted = build_ensemble(
        backend, images[None], maps[None], types[None], members, encode, shift=False
    )
    assert unshifted.bias == 0.0
    queries = images[:2]
    torch.testing.assert_close(
        ensemble_module.member_probabilities(shifted, queries, backend.decode_members),
        ensemble_module.member_probabilities(unshifted, queries, backend.decode_members),
        rtol=0,
        atol=0,
    )


def test_segmenter_shift_moves_the_mask_not_the_probabilities(
    model: PromptSegNet, monkeypatch
) -> None:
    monkeypatch.setattr(ensemble_module, "calibration_bias", lambda logits, masks: 2.0)
    monkeypatch.setattr(ensemble_module, "calibration_temperature", lambda logits, masks: 1.0)
    examples = pairs(4)
    images, masks = [i for i, _ in examples], [m for _, m in examples]
    volume = np.stack(images[:3], axis=2).astype(np.float32)
    on = Segmenter(model, device="cpu", ensemble=4)
    off = Segmenter(model, device="cpu", ensemble=4, ensemble_shift=False)
    prompts_on, prompts_off = on.encode_prompts(images, masks), off.encode_prompts(images, masks)
    assert (
        prompts_on.shift == 2.0 and prompts_off.shift == 0.0 and prompts_off.mask_threshold() == 0.5
    )
    result_on, result_off = (
        on.segment_volume(volume, prompts_on),
        off.segment_volume(volume, prompts_off),
    )
    np.testing.assert_array_equal(result_on.probabilities, result_off.probabilities)
    assert np.array_equal(result_on.mask, result_on.probabilities > prompts_on.mask_threshold())
    assert np.array_equal(result_off.mask, result_off.probabilities > 0.5)
    assert result_on.mask.sum() >= result_off.mask.sum()
    labels = on.segment_labels([images[0]], {1: prompts_on})[0]
    assert labels.shifts == (2.0,)
    assert np.array_equal(labels.masks[0], labels.probabilities[0] > prompts_on.mask_threshold(0.5))


def test_calibration_temperature_softens_overconfident_and_sharpens_shy_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 16, 16, generator=generator) > 0.5).float()
    wrong = torch.rand(3, 16, 16, generator=generator) < 0.2
    confident = (
        torch.where(wrong, 1 - masks, masks) * 16.0 - 8.0
    )  # +-8, a fifth of the pixels wrong
    assert calibration_temperature(confident, masks) > 2.0
    assert (
        calibration_temperature(masks * 1.0 - 0.5, masks) == TEMPERATURE_GRID.min()
    )  # +-0.5, all right
    assert calibration_temperature(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4)) == 1.0


def test_members_divide_their_logits_by_the_temperature_and_the_shift_follows(
    model: PromptSegNet,
) -> None:
    rng = np.random.default_rng(0)
    examples = [disk_example(rng, (32, 32)) for _ in range(3)]
    images = torch.stack(
        [torch.from_numpy(i).float().div(255).expand(3, -1, -1) for i, _ in examples]
    )
    maps = torch.stack([torch.from_numpy(m > 0).float() for _, m in examples])
    backend = create_backend("torch", model, "cpu")
    state = backend.encode(images[None], maps[None], torch.ones(1, 3, dtype=torch.long))
    ensemble = Ensemble((Member((0, 1, 2), (), None),), (state,), bias=1.0, temperature=2.0)
    got = ensemble_module.member_probabilities(ensemble, images[:2], backend.decode_members)[0]
    torch.testing.assert_close(
        got, torch.sigmoid(backend.decode(images[:2], state) / 2.0), rtol=0, atol=1e-6
    )
    assert ensemble.shift == 0.5
    logits = backend.decode(images[:2], state)
    assert torch.equal(got > decision_threshold(0.5, ensemble.shift), logits + 1.0 > 0)


class FixedPredictor:
    """Probabilities 0.3 on the query masks, 0 elsewhere, with a chosen mask threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def predict_with_threshold(self, episode: Episode) -> Prediction:
        return Prediction(0.3 * episode.query_masks.float(), self.threshold)


def test_eval_scores_dice_at_the_predictors_threshold_and_ece_on_its_probabilities(
    model: PromptSegNet,
) -> None:
    task = synthetic_task(np.random.default_rng(0), 32, 6, channels=3)
    report = evaluate(
        {"low": FixedPredictor(0.2), "half": FixedPredictor(0.5)},
        [task],
        [2],
        1,
        queries=2,
        progress=False,
    )
    low, half = (report.scores[m][(task.group, task.name)][2] for m in ("low", "half"))
    assert low.dice == [100.0] and half.dice[0] < 100.0
    assert low.ece == half.ece  # the same probabilities: calibration does not see the threshold
    predictor = ModelPredictor(model, ensemble=4, ensemble_shift=False)
    episode = fixed_episodes(task, shots=3, queries=2, count=1, seed=0)[0]
    prediction = predictor.predict_with_threshold(episode)
    assert prediction.threshold == 0.5
    assert torch.equal(prediction.probabilities, predictor.predict(episode))


def test_cli_ensemble_shift_off_writes_the_mask_of_the_unshifted_probabilities(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
    monkeypatch,
) -> None:
    monkeypatch.setattr(ensemble_module, "calibration_bias", lambda logits, masks: 3.0)
    monkeypatch.setattr(ensemble_module, "calibration_temperature", lambda logits, masks: 1.0)
    options = []
    for index, (image, mask) in enumerate(pairs(3, (40, 48))):
        options += [
            "--prompt",
            str(write_png(tmp_path / f"i{index}.png", image)),
            str(write_png(tmp_path / f"m{index}.png", mask)),
        ]
    query = write_png(tmp_path / "q.png", pairs(4, (44, 30))[3][0])
    written = {}
    for shift in ("on", "off"):
        out = tmp_path / shift
        assert (
            main(
                [
                    "segment",
                    *options,
                    "--checkpoint",
                    str(tiny_checkpoint),
                    "--device",
                    "cpu",
                    "--no-progress",
                    "--query",
                    str(query),
                    "--ensemble",
                    "3",
                    "--ensemble-shift",
                    shift,
                    "--save-probabilities",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        written[shift] = (
            np.load(out / "q_prob.npy"),
            np.asarray(Image.open(out / "q_mask.png")) > 0,
        )
    np.testing.assert_array_equal(written["on"][0], written["off"][0])
    assert np.array_equal(written["off"][1], written["off"][0] > 0.5)
    assert np.array_equal(written["on"][1], written["on"][0] > decision_threshold(0.5, 3.0))
    assert written["on"][1].sum() >= written["off"][1].sum()
