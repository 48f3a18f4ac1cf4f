"""PNG charts of eval reports and training logs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.errors import InputError
from promptseg.eval.evaluate import CellScore, EvalReport
from promptseg.eval.plot import PALETTE, plot_dice_against_k, plot_training_curves, read_training_log, smooth


def colour_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.asarray(Image.open(path).convert("RGB")) == colour, axis=-1).sum())


def test_dice_chart_draws_one_line_per_method(tmp_path: Path) -> None:
    tasks = [("g", "a"), ("g", "b")]
    scores = {m: {t: {k: CellScore([10.0 * k + n]) for k in (1, 2, 4)} for t in tasks} for n, m in enumerate(["x", "y"])}
    report = EvalReport(["x", "y"], [1, 2, 4], tasks, {"episodes": 1, "queries": 1, "seed": 0, "shots": [1, 2, 4]}, scores)
    plot_dice_against_k(report, tmp_path / "dice.png", "test")
    assert Image.open(tmp_path / "dice.png").size == (720, 440)
    assert colour_pixels(tmp_path / "dice.png", PALETTE[0]) > 50 and colour_pixels(tmp_path / "dice.png", PALETTE[1]) > 50


def test_training_curve_and_bad_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 2.0 / s}) for s in range(1, 301)) + "\n")
    steps, losses = read_training_log(log)
    assert steps[-1] == 300 and losses[0] == 2.0
    plot_training_curves({"run": log}, tmp_path / "curve.png", window=10)
    assert colour_pixels(tmp_path / "curve.png", PALETTE[0]) > 50
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl: no training steps logged"):
        read_training_log(tmp_path / "empty.jsonl")


def test_smooth_is_a_trailing_mean() -> None:
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
