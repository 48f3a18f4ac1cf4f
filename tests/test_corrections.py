"""Corrections on the query (issue 18 item 3): clicks and scribbles, Segmenter.refine and
`segment --correct`, and the simulated user of `eval --interactive` (item 4)."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint, write_disk_dataset, write_nifti, write_png  # noqa: F401 (fixture)
from PIL import Image

from promptseg.cli import main
from promptseg.engine.corrections import CorrectionSettings, parse_click, refine_probabilities
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import InputError
from promptseg.eval.interactive import (
    CAP,
    click_curve,
    clicks_to_target,
    next_click,
)
from promptseg.metrics import dice_percent

NO_SHIFT = CorrectionSettings(shift=0.0, model_weight=0.0)


def two_disks(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An image with two bright disks on a dark ground and its truth (both disks)."""
    y, x = np.mgrid[:size, :size]
    truth = ((x - 18) ** 2 + (y - 20) ** 2 <= 64) | ((x - 44) ** 2 + (y - 40) ** 2 <= 81)
    image = np.where(truth, 200.0, 50.0) + np.random.default_rng(0).normal(0, 5, (size, size))
    return image.astype(np.float32), truth


def test_a_positive_click_fills_a_missed_part_and_a_negative_one_removes_a_false_one() -> None:
    image, truth = two_disks()
    missed = np.where(truth & (np.arange(64)[None, :] < 32), 0.9, 0.1).astype(
        np.float32
    )  # second disk missed
    fixed = refine_probabilities(missed, image, clicks=[(44, 40, True)])
    assert dice_percent(fixed > 0.5, truth) > dice_percent(missed > 0.5, truth) + 20
    assert (fixed > 0.5)[
        ~truth
    ].sum() < 0.05 * truth.sum()  # intensity-aware: the dark ground stays out
    false = np.where(truth, 0.9, 0.1).astype(np.float32)
    false[50:60, 5:15] = 0.8  # a false blob
    cleaned = refine_probabilities(false, image, clicks=[(10, 55, False)])
    assert not (cleaned[50:60, 5:15] > 0.5).any() and ((cleaned > 0.5) == truth).all()


def test_scribbles_and_3d_clicks() -> None:
    image, truth = two_disks()
    strokes = np.zeros_like(truth)
    strokes[40, 40:48] = True
    scribbled = refine_probabilities(
        np.full(truth.shape, 0.1, np.float32), image, scribbles=[(strokes, True)]
    )
    assert (scribbled > 0.5)[40, 40:48].all() and (scribbled > 0.5)[~truth].sum() < 10
    volume = np.zeros((20, 20, 10), np.float32)
    volume[5:15, 5:15, 2:8] = 1.0
    p = np.full(volume.shape, 0.1, np.float32)
    out = refine_probabilities(p, volume, clicks=[(10, 10, 5, True)], spacing=(1.0, 1.0, 2.0))
    assert (out > 0.5)[10, 10, 5] and (out > 0.5).sum() > 1 and not (out > 0.5)[volume == 0].any()


def test_bad_clicks_are_one_line_naming_correct() -> None:
    p = np.zeros((8, 8), np.float32)
    for click, message in (
        ((1, 2, 3, True), "a click on a 2D query is"),
        ((20, 2, True), "lies outside"),
        ((1, 2, "yes"), "polarity"),
    ):
        with pytest.raises(InputError, match=message):
            refine_probabilities(p, clicks=[click])
    assert parse_click(["3", "4", "+"]) == (3.0, 4.0, True)
    assert parse_click(["3", "4", "5", "-"]) == (3.0, 4.0, 5.0, False)
    for bad in (["3", "+"], ["3", "4", "x"], ["a", "4", "-"], ["nan", "4", "+"]):
        with pytest.raises(InputError, match="--correct"):
            parse_click(bad)


def test_refine_keeps_the_prompt_cache_and_the_grid(tiny_checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    image, mask = disk_example(rng, (32, 32))
    prompts = segmenter.encode_prompts([image], [mask])
    volume = np.stack([disk_example(rng, (24, 24))[0] for _ in range(6)], axis=-1).astype(
        np.float32
    )
    result = segmenter.segment_volume(volume, prompts)
    cached = len(segmenter.cache)
    refined = segmenter.refine(result, clicks=[(12, 12, 3, True)])
    assert refined.probabilities.shape == volume.shape and refined.mask[12, 12, 3]
    assert len(segmenter.cache) == cached and refined.source is result.source
    query, _ = disk_example(rng, (24, 28))
    probabilities = segmenter.segment([query], prompts)[0]
    assert not segmenter.refine(probabilities, clicks=[(3, 3, False)], image=query)[3, 3] > 0.5


def test_segment_cli_correct_edits_the_written_mask(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    rng = np.random.default_rng(1)
    image, mask = disk_example(rng, (40, 48))
    write_png(tmp_path / "p.png", image)
    write_png(tmp_path / "p_mask.png", mask * 255)
    write_png(tmp_path / "q.png", image)
    common = [
        "segment",
        "--prompt",
        tmp_path / "p.png",
        tmp_path / "p_mask.png",
        "--query",
        tmp_path / "q.png",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([str(a) for a in common + ["--out", tmp_path / "a"]]) == 0
    assert (
        main(
            [
                str(a)
                for a in common
                + [
                    "--out",
                    tmp_path / "b",
                    "--correct",
                    "2",
                    "3",
                    "+",
                    "--correct",
                    "24",
                    "20",
                    "-",
                ]
            ]
        )
        == 0
    )
    plain = np.asarray(Image.open(tmp_path / "a" / "q_mask.png"))
    corrected = np.asarray(Image.open(tmp_path / "b" / "q_mask.png"))
    assert corrected[3, 2] == 255 and corrected[20, 24] == 0 and plain.shape == corrected.shape
    assert (
        main([str(a) for a in common + ["--out", tmp_path / "c", "--correct", "2", "x", "+"]]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--correct" in err[0] and not (tmp_path / "c").exists()
    assert (
        main([str(a) for a in common + ["--out", tmp_path / "d", "--correct", "2", "3", "4", "+"]])
        == 2
    )
    assert "a click on a 2D query is (x, y, positive)" in capsys.readouterr().err


def test_the_simulated_user_clicks_the_centre_of_the_largest_error() -> None:
    truth = np.zeros((30, 30), dtype=bool)
    truth[5:25, 5:25] = True
    prediction = truth.copy()
    prediction[5:25, 15:25] = False  # a 20 x 10 miss
    prediction[0:3, 0:3] = True  # a small false region
    x, y, positive = next_click(prediction, truth)
    assert positive and 15 <= x <= 24 and 12 <= y <= 17
    assert next_click(truth, truth) is None
    volume = np.zeros((12, 10, 8), dtype=bool)
    volume[2:10, 2:8, 1:7] = True
    partial = volume.copy()
    partial[2:10, 2:8, 4:7] = False  # a miss on the last three slices
    *point, positive = next_click(partial, volume, spacing=(1.0, 1.0, 2.0))
    assert positive and len(point) == 3 and volume[tuple(int(v) for v in point)] and point[2] >= 4
    assert clicks_to_target([50.0, 80.0, 91.0]) == 2 and clicks_to_target([95.0]) == 0
    assert clicks_to_target([10.0] * 30) == CAP
    image = truth.astype(np.float32)
    curve = click_curve(np.where(prediction, 0.9, 0.1).astype(np.float32), image, truth, 3)
    assert len(curve) == 4 and curve[-1] > curve[0] + 20 and curve[-1] >= 95


def test_eval_interactive_reports_dice_per_round(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    root = write_disk_dataset(tmp_path / "disks", 4, labels={"background": 0, "disk": 1})
    out = tmp_path / "interactive.json"
    assert (
        main(
            [
                "eval",
                "--data",
                str(root),
                "--shots",
                "1",
                "--episodes",
                "1",
                "--queries",
                "2",
                "--interactive",
                "2",
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    task = report["tasks"]["disks/disk"]
    assert len(task["dice_per_round"]) == 3 and 0 <= task["clicks_to_90"] <= CAP
    assert task["dice_per_round"][2] >= task["dice_per_round"][0]
    assert "clicks to 90" in capsys.readouterr().out
    assert main(["eval", "--data", str(root), "--interactive", "21", "--no-progress"]) == 2


def test_the_model_widens_a_click_toward_what_it_finds_likely() -> None:
    # columns: 0-9 the mask (200), 10-19 sure background (105), 20-29 the clicked miss (100),
    # 30-39 a brighter part the model nearly found (140), 40+ background (200)
    image = np.full((64, 64), 200.0, dtype=np.float32)
    image[:, 10:20], image[:, 20:30], image[:, 30:40] = 105.0, 100.0, 140.0
    probabilities = np.full((64, 64), 0.01, dtype=np.float32)
    probabilities[:, :10], probabilities[:, 20:30], probabilities[:, 30:40] = 0.9, 0.1, 0.49
    click = [(25, 32, True)]
    plain = CorrectionSettings(tolerance=0.5, model_weight=0.0, shift=0.0)
    blind = refine_probabilities(probabilities, image, click, settings=plain) > 0.5
    assert blind[32, 15] and blind[32, 25] and not blind[32, 35]
    aware = dataclasses.replace(plain, model_weight=1.0)
    seen = refine_probabilities(probabilities, image, click, settings=aware) > 0.5
    assert not seen[32, 15] and seen[32, 25] and seen[32, 35] and not seen[32, 45]


def test_a_click_where_the_model_was_wrong_shifts_every_logit() -> None:
    probabilities = np.full((40, 40), 0.3, dtype=np.float32)
    probabilities[:10, :10] = 0.9
    settings = CorrectionSettings(shift=2.0, max_shift=2.0, model_weight=0.0)
    raised = refine_probabilities(probabilities, None, [(20, 20, True)], settings=settings)
    assert raised.dtype == np.float32 and raised[39, 39] > 0.5 and raised[0, 0] > 0.9
    kept = refine_probabilities(probabilities, None, [(20, 20, True)], settings=NO_SHIFT)
    assert kept[39, 39] == pytest.approx(0.3)
    lowered = refine_probabilities(1 - probabilities, None, [(20, 20, False)], settings=settings)
    assert lowered[39, 39] < 0.5
    capped = dataclasses.replace(settings, shift=10.0, max_shift=0.5)  # logit -0.85 + 0.5 < 0
    capped_result = refine_probabilities(probabilities, None, [(20, 20, True)], settings=capped)
    assert capped_result[39, 39] < 0.5
    # a click on the side the model already gives moves nothing
    assert np.array_equal(
        refine_probabilities(probabilities, None, [(2, 2, True)], settings=settings)[20:, 20:],
        probabilities[20:, 20:],
    )


def test_refine_takes_correction_settings_and_checks_them(tiny_checkpoint: Path) -> None:
    """Segmenter.refine passes its settings on (no shift and no model term give another result
    than the defaults for a click where the model was wrong); bad settings are a ValueError."""
    rng = np.random.default_rng(2)
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    image, mask = disk_example(rng, (32, 32))
    prompts = segmenter.encode_prompts([image], [mask])
    query, _ = disk_example(rng, (32, 32))
    probabilities = segmenter.segment([query], prompts)[0]
    low = np.unravel_index(np.argmin(probabilities), probabilities.shape)
    click = [(int(low[1]), int(low[0]), True)]
    default = segmenter.refine(probabilities, clicks=click, image=query)
    plain = segmenter.refine(
        probabilities,
        clicks=click,
        image=query,
        settings=CorrectionSettings(model_weight=0.0, shift=0.0),
    )
    assert default.shape == plain.shape and not np.allclose(default, plain)
    expected = refine_probabilities(
        probabilities, query, click, settings=CorrectionSettings(model_weight=0.0, shift=0.0)
    )
    np.testing.assert_array_equal(plain, expected)
    for bad in ({"reach": -1.0}, {"shift": float("nan")}, {"max_radius": 2.0}, {"tolerance": "1"}):
        with pytest.raises(ValueError, match="CorrectionSettings"):
            CorrectionSettings(**bad)
