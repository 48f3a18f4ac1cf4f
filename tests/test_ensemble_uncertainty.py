"""Ensembles over prompt subsets and flips, uncertainty maps, candidates and calibration scores
(issue 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example

from promptseg import Segmenter
from promptseg.engine.backends import create_backend
from promptseg.engine.ensemble import (
    MAX_ENSEMBLE,
    Member,
    build_ensemble,
    calibration_bias,
    flipped,
    mean_probabilities,
    member_probabilities,
    plan_members,
)
from promptseg.eval.baselines import ensemble_probabilities
from promptseg.eval.evaluate import CellScore, EvalReport, correlation
from promptseg.metrics import expected_calibration_error
from promptseg.model import PromptSegNet


@pytest.fixture
def model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY_CONFIG).eval()


def prompt_tensors(
    count: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (K, 3, R, R), disk masks (K, R, R), mask types (K,), two queries (2, 3, R, R)."""
    rng = np.random.default_rng(seed)
    size = TINY_CONFIG.resolution
    pairs = [disk_example(rng, (size, size)) for _ in range(count + 2)]
    images = torch.stack([torch.from_numpy(i).float().div(255).expand(3, -1, -1) for i, _ in pairs])
    masks = torch.stack([torch.from_numpy(m > 0).float() for _, m in pairs])
    return images[:count], masks[:count], torch.ones(count, dtype=torch.long), images[count:]


def test_members_start_with_the_prompt_set_as_given_then_drop_one_subsets_then_flips() -> None:
    members = plan_members(3, MAX_ENSEMBLE, seed=0)
    assert members[0] == Member((0, 1, 2), (), None)
    assert sorted(m.held for m in members[1:4]) == [0, 1, 2]
    assert all(m.held not in m.keep and len(m.keep) == 2 and m.flip == () for m in members[1:4])
    assert [m.flip for m in members[4:8]] == [(-1,)] * 4 and len(members) == MAX_ENSEMBLE
    assert [m.flip for m in plan_members(1, 8)] == [
        (),
        (-1,),
        (-2,),
        (-2, -1),
    ]  # one prompt: its flips only
    with pytest.raises(ValueError, match="1..16"):
        plan_members(3, MAX_ENSEMBLE + 1)


def test_an_ensemble_of_one_member_is_the_plain_prediction(model: PromptSegNet) -> None:
    images, maps, types, queries = prompt_tensors(3)
    backend = create_backend("torch", model, "cpu")
    plain = torch.sigmoid(
        backend.decode(queries, backend.encode(images[None], maps[None], types[None]))
    )
    ensemble = build_ensemble(
        backend,
        images[None],
        maps[None],
        types[None],
        plan_members(3, 1),
        lambda flip, keep: backend.encode(images[None], maps[None], types[None]),
    )
    assert ensemble.bias == 0.0
    torch.testing.assert_close(
        member_probabilities(ensemble, queries, backend.decode_members)[0], plain, rtol=0, atol=0
    )


def test_subset_slices_and_batched_members_match_separate_encodings(model: PromptSegNet) -> None:
    images, maps, types, queries = prompt_tensors(4)
    backend = create_backend("torch", model, "cpu")
    full = backend.encode(images[None], maps[None], types[None])
    keep = [0, 2, 3]
    sliced = backend.select_prompts(full, keep, 4)
    direct = backend.encode(images[None, keep], maps[None, keep], types[None, keep])
    torch.testing.assert_close(
        backend.decode(queries, sliced), backend.decode(queries, direct), rtol=0, atol=1e-5
    )
    together = backend.decode_members(queries, [full, sliced])  # padded to one batch of two groups
    torch.testing.assert_close(together[0], backend.decode(queries, full), rtol=0, atol=1e-5)
    torch.testing.assert_close(together[1], backend.decode(queries, direct), rtol=0, atol=1e-5)


def test_ensemble_members_and_mean_are_tempered_and_unshifted(model: PromptSegNet) -> None:
    images, maps, types, queries = prompt_tensors(3)
    backend = create_backend("torch", model, "cpu")
    members = plan_members(3, 5)
    got, shift = ensemble_probabilities(backend, images, maps, types, queries, 5)
    ensemble = build_ensemble(
        backend,
        images[None],
        maps[None],
        types[None],
        members,
        lambda flip, keep: backend.encode(
            flipped(images[None, list(keep)], flip),
            flipped(maps[None, list(keep)], flip),
            types[None, list(keep)],
        ),
    )
    expected = []
    for member in members:
        keep = list(member.keep)
        state = backend.encode(
            flipped(images[None, keep], member.flip),
            flipped(maps[None, keep], member.flip),
            types[None, keep],
        )
        logits = flipped(backend.decode(flipped(queries, member.flip), state), member.flip)
        expected.append(torch.sigmoid(logits / ensemble.temperature))
    together = member_probabilities(ensemble, queries, backend.decode_members)  # members batched
    torch.testing.assert_close(together, torch.stack(expected), rtol=0, atol=1e-5)
    # the ensemble's own probability decodes each flip once, from its members' mean features
    mean = mean_probabilities(ensemble, queries, backend.decode_mean, backend.decode_members)
    torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)
    assert shift == ensemble.shift == ensemble.bias / ensemble.temperature


def test_calibration_shift_fixes_a_shy_prediction() -> None:
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:6, 2:6] = 1
    logits = torch.where(
        masks > 0, torch.tensor(-0.6), torch.tensor(-3.0)
    )  # foreground just below 0.5
    bias = calibration_bias(logits, masks)
    assert 0.6 < bias <= 3.0 and bias == min(b for b in np.arange(-4, 4.01, 0.25) if 0.6 < b <= 3.0)
    assert calibration_bias(logits + 5.0, masks) < 0  # too eager: shifted down
    assert calibration_bias(torch.zeros(0, 8, 8), torch.zeros(0, 8, 8)) == 0.0


def test_expected_calibration_error_on_a_hand_made_example() -> None:
    probs = torch.tensor([0.05, 0.15, 0.95, 0.95, 1.0])
    masks = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
    # bins [0, .1): |0 - .05|; [.1, .2): |0 - .15|; [.9, 1]: 3 pixels, 2 foreground, mean p 2.9 / 3
    expected = 100 * (0.05 + 0.15 + abs(2 - 2.9)) / 5
    assert expected_calibration_error(probs, masks) == pytest.approx(expected)
    assert expected_calibration_error(masks, masks) == 0.0  # sure and right
    assert expected_calibration_error(1 - masks, masks) == 100.0  # sure and wrong
    assert correlation([1, 2, 3], [2, 4, 7]) > 0.9 and correlation([1, 1, 1], [1, 2, 3]) is None


def test_report_keeps_calibration_through_json(tmp_path: Path) -> None:
    cell = CellScore([80.0, 60.0], [5.0, 15.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.5])
    report = EvalReport(
        ["m"],
        [1],
        [("g", "t")],
        {"episodes": 2, "queries": 2, "seed": 0, "shots": [1]},
        {"m": {("g", "t"): {1: cell}}},
        {"m": 1.0},
    )
    report.write(tmp_path / "r.json")
    again = EvalReport.load(tmp_path / "r.json")
    assert again.scores["m"][("g", "t")][1] == cell
    ece, corr = again.calibration("m", 1)
    assert ece == 10.0 and corr == pytest.approx(correlation(cell.query_entropy, cell.query_error))
    assert "10.0 / " in again.to_markdown()


def test_segmenter_results_carry_uncertainty_variance_and_candidates(model: PromptSegNet) -> None:
    rng = np.random.default_rng(1)
    pairs = [disk_example(rng, (40, 36)) for _ in range(3)]
    seg = Segmenter(model, device="cpu", ensemble=4, candidates=2)
    prompts = seg.encode_prompts([i for i, _ in pairs], [m for _, m in pairs])
    assert len(prompts.ensemble.members) == 4
    volume = np.stack([i for i, _ in pairs], axis=2).astype(np.float32)
    result = seg.segment_volume(volume, prompts)
    assert result.uncertainty.shape == result.variance.shape == volume.shape
    assert result.candidates.shape == (2,) + volume.shape
    assert float(result.uncertainty.max()) <= 1.0 and float(result.variance.min()) >= 0.0
    labels = seg.segment_labels([pairs[0][0]], {1: prompts})[0]
    assert labels.uncertainty.shape == labels.variance.shape == (1, 40, 36)
    assert labels.candidates.shape == (2, 1, 40, 36)
    single = Segmenter(model, device="cpu")
    plain = single.segment_labels(
        [pairs[0][0]], {1: single.encode_prompts([i for i, _ in pairs], [m for _, m in pairs])}
    )[0]
    assert (
        plain.variance is None
        and plain.candidates is None
        and plain.uncertainty.shape == (1, 40, 36)
    )
