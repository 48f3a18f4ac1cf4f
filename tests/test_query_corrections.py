"""Corrections read by the model (issue 18 item 3): the correction maps, a query-corrections model,
its training with simulated clicks, `Segmenter.refine(..., prompts=...)` and `eval --interactive`
with the model's corrections."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, tiny_checkpoint, write_disk_dataset, write_png  # noqa: F401 (fixture)

from promptseg.cli import main
from promptseg.engine.corrections import refine_probabilities
from promptseg.engine.model_corrections import (
    combined,
    correction_input,
    mark_arrays,
    marks_at_resolution,
)
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import InputError
from promptseg.eval.interactive import click_curve, next_scribble
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.loss import segmentation_losses
from promptseg.model.query_corrections import CLICK_SIGMA, click_maps
from promptseg.model.weights import load_model, save_weights
from promptseg.train.config import TrainConfig
from promptseg.train.simulated_corrections import (
    clicked_regions,
    correction_counts,
    error_clicks,
    round_counts,
)
from promptseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
CORRECTING = dataclasses.replace(TINY_CONFIG, query_corrections=True)


def random_prompts(generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, ...]:
    images = torch.rand(1, 3, 3, size, size, generator=generator)
    maps = (torch.rand(1, 3, size, size, generator=generator) > 0.6).float()
    return images, maps, torch.ones(1, 3, dtype=torch.long)


def correcting_model(seed: int = 0) -> PromptSegNet:
    """A tiny query-corrections model whose correction stem is not zero (as after training)."""
    torch.manual_seed(seed)
    model = PromptSegNet(CORRECTING).eval()
    torch.nn.init.normal_(model.encoder.correction_stem.weight, std=0.5)
    torch.nn.init.normal_(model.query_decoder.correction_fuse.weight, std=0.5)
    return model


def test_click_maps_are_gaussian_bumps_by_polarity() -> None:
    maps = click_maps([(5, 9, True), (20, 3, False), (21, 3, False)], 32)
    assert maps.shape == (2, 32, 32) and maps[0, 9, 5] == 1.0 and maps[1, 3, 20] == 1.0
    assert maps[0, 3, 20] < 1e-6 and maps[1, 9, 5] < 1e-6
    expected = np.exp(-(3.0**2 + 4.0**2) / (2 * CLICK_SIGMA**2))
    assert maps[0, 12, 9].item() == pytest.approx(expected, rel=1e-5)
    assert not click_maps([], 16).any()


def test_zero_corrections_leave_the_model_unchanged_and_marks_change_it() -> None:
    generator = torch.Generator().manual_seed(1)
    model = correcting_model()
    images, maps, types = random_prompts(generator)
    queries = torch.rand(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        plain = model(images, maps, types, queries)
        zeros = model(images, maps, types, queries, corrections=torch.zeros(2, 2, 32, 32))
        clicked = model(
            images,
            maps,
            types,
            queries,
            corrections=torch.stack([click_maps([(8, 8, True)], 32)] * 2),
        )
    torch.testing.assert_close(zeros, plain, rtol=0, atol=0)
    assert (clicked - plain).abs().max() > 1e-3
    fresh = PromptSegNet(CORRECTING).eval()  # zero stem at initialisation: no effect at all
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(images, maps, types, queries, corrections=torch.rand(2, 2, 32, 32)),
            fresh(images, maps, types, queries),
            rtol=0,
            atol=0,
        )
    with pytest.raises(ValueError, match="corrections must be"):
        model(images, maps, types, queries, corrections=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="without query_corrections"):
        PromptSegNet(TINY_CONFIG)(
            images, maps, types, queries, corrections=torch.zeros(2, 2, 32, 32)
        )


def test_config_keeps_old_files_and_refuses_what_cannot_be() -> None:
    assert "query_corrections" not in TINY_CONFIG.to_dict()
    assert ModelConfig.from_dict(CORRECTING.to_dict()) == CORRECTING
    with pytest.raises(ValueError, match="vit takes no query corrections"):
        ModelConfig(architecture="vit", label_propagation=False, query_corrections=True)
    config = TrainConfig.load(REPO / "configs" / "tiny_test.yaml")
    assert any(
        "correction_fraction" in p
        for p in dataclasses.replace(config, correction_fraction=0.5).problems()
    )


def test_simulated_clicks_fall_in_the_largest_error_regions() -> None:
    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    prediction = truth.copy()
    prediction[5:25, 5:12] = False  # a missed band, 140 pixels
    prediction[30:35, 30:35] = True  # a false blob, 25 pixels
    prediction[0, 39] = True  # a one-pixel false positive
    rng = np.random.default_rng(0)
    for _ in range(20):
        (x1, y1, p1), (x2, y2, p2) = error_clicks(prediction, truth, 2, rng)
        assert p1 and 5 <= y1 < 25 and 5 <= x1 < 12
        assert not p2 and 30 <= y2 < 35 and 30 <= x2 < 35
    assert len(error_clicks(prediction, truth, 5, rng)) == 3
    assert error_clicks(truth, truth, 3, rng) == []
    regions = clicked_regions(prediction, truth, [(8.0, 10.0, True)])
    assert regions.sum() == 140 and regions[10, 8] and not regions[31, 31]
    logits, targets = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    weights = torch.ones(1, 4, 4)
    weights[0, 0] = 3.0  # a quarter of the pixels weigh 3: BCE x 1.5
    plain, weighted = (
        segmentation_losses(logits, targets),
        segmentation_losses(logits, targets, 1.0, weights),
    )
    bce = float(np.log(2.0))
    assert weighted.item() - plain.item() == pytest.approx(0.5 * bce, rel=1e-5)
    counts = correction_counts(1000, 0.5, 5, rng)
    assert 400 < (counts > 0).sum() < 600 and counts.max() == 5
    shares = round_counts(counts, 2)
    assert np.array_equal(shares[0] + shares[1], counts) and (shares[0][counts > 0] >= 1).all()


def test_training_with_simulated_corrections_warm_starts_and_learns_the_stem(
    tmp_path: Path,
) -> None:
    tiny = TrainConfig.load(REPO / "configs" / "tiny_test.yaml")
    plain = tmp_path / "plain.safetensors"
    torch.manual_seed(0)
    save_weights(PromptSegNet(tiny.model_config()), plain)
    config = dataclasses.replace(
        tiny,
        model={**tiny.model, "query_corrections": True},
        correction_fraction=1.0,
        correction_region_weight=4.0,
        steps=4,
        checkpoint_every=2,
    )
    trainer = Trainer(config, [], tmp_path / "run", progress=False, init=plain)
    start = load_model(plain)
    assert not trainer.model.encoder.correction_stem.weight.any()
    assert not trainer.model.query_decoder.correction_fuse.weight.any()
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], tensor)
    stem_group = trainer.optimizer.param_groups[-1]
    assert stem_group["lr_scale"] == config.correction_lr_scale
    expected = [
        trainer.model.encoder.correction_stem.weight,
        trainer.model.query_decoder.correction_fuse.weight,
    ]
    assert len(stem_group["params"]) == 2
    assert all(a is b for a, b in zip(stem_group["params"], expected))
    trainer.run()
    model = load_model(tmp_path / "run" / "final.safetensors")
    assert model.config.query_corrections and model.encoder.correction_stem.weight.abs().sum() > 0
    # the simulated clicks are a function of seed and step: a second run takes the same path
    train(config, [], tmp_path / "again", device="cpu", progress=False, init=plain)
    again = load_model(tmp_path / "again" / "final.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)


def test_marks_reach_the_model_input_where_they_lie() -> None:
    marks = np.zeros((100, 50), bool)
    marks[0, 0] = marks[99, 49] = marks[50, 25] = True
    small = marks_at_resolution(marks, 32)
    assert small[0, 0] and small[31, 31] and small[16, 16] and small.sum() == 3
    positive, negative = mark_arrays((100, 50), clicks=[(25, 50, True), (3, 4, False)])
    assert positive[50, 25] and negative[4, 3] and positive.sum() == negative.sum() == 1
    inputs = correction_input(positive, negative, 32)
    assert inputs.shape == (2, 32, 32) and inputs[0, 16, 16] == 1.0 and inputs[1, 1, 2] == 1.0
    with pytest.raises(InputError, match="--correct"):
        mark_arrays((10, 10), clicks=[(30, 3, True)])


def test_refine_with_prompts_segments_again_with_the_corrections() -> None:
    rng = np.random.default_rng(0)
    segmenter = Segmenter(correcting_model(), device="cpu", backend="torch")
    assert segmenter.corrects_with_model
    image, mask = disk_example(rng, (32, 32))
    prompts = segmenter.encode_prompts([image], [mask])
    query, _ = disk_example(rng, (40, 36))
    probabilities = segmenter.segment([query], prompts)[0]
    same = segmenter.refine(probabilities, image=query, prompts=prompts, local_edit=False)
    np.testing.assert_allclose(same, probabilities, atol=1e-6)  # no correction: the same
    clicked = segmenter.refine(
        probabilities, clicks=[(10, 12, True)], image=query, prompts=prompts, local_edit=False
    )
    assert clicked.shape == (40, 36) and np.abs(clicked - probabilities).max() > 1e-3
    edited = segmenter.refine(probabilities, clicks=[(10, 12, True)], image=query, prompts=prompts)
    local = refine_probabilities(probabilities, query, [(10, 12, True)])
    np.testing.assert_allclose(edited, combined(probabilities, local, clicked), atol=1e-6)
    with pytest.raises(InputError, match="needs its query"):
        segmenter.refine(probabilities, clicks=[(1, 1, True)], prompts=prompts)

    volume = np.stack([disk_example(rng, (24, 20))[0] for _ in range(5)], axis=-1)
    result = segmenter.segment_volume(volume.astype(np.float32), prompts, axis=2)
    refined = segmenter.refine(result, clicks=[(5, 6, 3, False)], prompts=prompts, local_edit=False)
    changed = np.abs(refined.probabilities - result.probabilities).max(axis=(0, 1))
    assert changed[3] > 1e-3 and not np.delete(changed, 3).any()  # only the clicked slice


def test_refine_with_prompts_needs_a_model_that_reads_corrections(tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    image, mask = disk_example(rng, (32, 32))
    plain = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    assert not plain.corrects_with_model
    prompts = plain.encode_prompts([image], [mask])
    probabilities = plain.segment([image], prompts)[0]
    with pytest.raises(InputError, match="does not read corrections"):
        plain.refine(probabilities, clicks=[(3, 3, True)], image=image, prompts=prompts)
    ensemble = Segmenter(correcting_model(), device="cpu", backend="torch", ensemble=2)
    members = ensemble.encode_prompts([image, image], [mask, mask])
    with pytest.raises(InputError, match="--ensemble 1"):
        ensemble.refine(probabilities, clicks=[(3, 3, True)], image=image, prompts=members)


def test_eval_interactive_with_the_models_corrections(tmp_path: Path, capsys) -> None:
    root = write_disk_dataset(tmp_path / "disks", 3, (32, 32), {"disk": 1})
    weights = tmp_path / "correcting.safetensors"
    save_weights(correcting_model(), weights)
    common = ["eval", "--data", str(root), "--shots", "1", "--episodes", "1", "--queries", "2"]
    common += ["--interactive", "2", "--checkpoint", str(weights), "--no-progress"]
    reports = {}
    for mode in ("edit", "model", "both"):
        out = tmp_path / f"{mode}.json"
        assert main([*common, "--interactive-corrections", mode, "--out", str(out)]) == 0
        reports[mode] = json.loads(out.read_text())
        assert reports[mode]["corrections"] == mode
    curves = {m: r["tasks"]["disks/disk"]["dice_per_round"] for m, r in reports.items()}
    assert curves["edit"][0] == curves["model"][0] == curves["both"][0]
    assert curves["model"][1:] != curves["edit"][1:]
    scribbled = tmp_path / "scribble.json"
    assert main([*common, "--interactive-user", "scribble", "--out", str(scribbled)]) == 0
    assert json.loads(scribbled.read_text())["user"] == "scribble"
    default = tmp_path / "default.json"
    assert main([*common, "--out", str(default)]) == 0
    assert json.loads(default.read_text())["corrections"] == "both"
    capsys.readouterr()
    plain = tmp_path / "plain.safetensors"
    save_weights(PromptSegNet(TINY_CONFIG), plain)
    args = [*common[:-3], "--checkpoint", str(plain), "--interactive-corrections", "model"]
    assert main([*args, "--no-progress"]) == 2
    assert "--interactive-corrections" in capsys.readouterr().err


def test_the_simulated_scribble_runs_along_the_largest_error_region() -> None:
    truth = np.zeros((40, 40), bool)
    truth[10:16, 4:36] = True  # a long band, all missed
    prediction = np.zeros_like(truth)
    prediction[30:33, 30:33] = True  # a small false blob
    strokes, positive = next_scribble(prediction, truth)
    assert positive and strokes.sum() > 20 and (strokes <= truth).all()
    rows = np.nonzero(strokes)[0]
    assert rows.min() == rows.max() == 12 or rows.min() == rows.max() == 13  # along the band
    assert next_scribble(truth, truth) is None
    image = truth.astype(np.float32)
    curve = click_curve(prediction.astype(np.float32), image, truth, 2, user="scribble")
    assert len(curve) == 3 and curve[1] > curve[0]


def test_model_and_local_corrections_join_in_logit_space() -> None:
    original = np.array([0.2, 0.5, 0.9], np.float32)
    edited = np.array([0.8, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(combined(original, edited, original), edited, atol=1e-6)
    np.testing.assert_allclose(combined(original, original, edited), edited, atol=1e-6)
    both = combined(original, edited, edited)  # both push the first pixel up: further up
    assert both[0] > edited[0] and both[1] == pytest.approx(0.5) and both[2] == pytest.approx(0.9)
    assert np.all(combined(np.full(2, 1e-9), np.ones(2), np.ones(2)) <= 1.0)


def test_segment_cli_correct_lets_a_correcting_model_read_the_clicks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image, mask = disk_example(rng, (40, 48))
    query, _ = disk_example(rng, (40, 48))
    write_png(tmp_path / "p.png", image)
    write_png(tmp_path / "p_mask.png", mask * 255)
    write_png(tmp_path / "q.png", query)
    weights = tmp_path / "correcting.safetensors"
    model = correcting_model()
    save_weights(model, weights)
    clicks = ["--correct", "30", "8", "+", "--correct", "24", "20", "-"]
    command = ["segment", "--prompt", tmp_path / "p.png", tmp_path / "p_mask.png"]
    command += ["--query", tmp_path / "q.png", "--checkpoint", weights, "--device", "cpu"]
    command += ["--no-progress", "--save-probabilities", "--out", tmp_path / "out", *clicks]
    assert main([str(a) for a in command]) == 0
    written = np.load(tmp_path / "out" / "q_prob.npy")
    segmenter = Segmenter(load_model(weights), device="cpu", backend="torch")
    prompts = segmenter.encode_prompts([image], [mask])
    first = segmenter.segment([query], prompts)[0]
    parsed = [(30, 8, True), (24, 20, False)]
    expected = segmenter.refine(first, parsed, image=query, prompts=prompts)
    local = segmenter.refine(first, parsed, image=query)
    np.testing.assert_allclose(written, expected, atol=1e-5)
    assert np.abs(expected - local).max() > 1e-2  # the model's pass changed what is written
