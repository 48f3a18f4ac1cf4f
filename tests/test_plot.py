"""PNG charts of eval reports and training logs (matplotlib, the `plot` extra)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.errors import InputError, PromptSegError
from promptseg.eval.evaluate import CellScore, EvalReport
from promptseg.eval.plot import (
    BAND_ALPHA,
    PALETTE,
    SIZE,
    episode_spread,
    moving_std,
    plot_dice_against_k,
    plot_training_curves,
    read_training_log,
    require_matplotlib,
    smooth,
)

pytest.importorskip("matplotlib", reason="the plot extra is not installed")


def colour_pixels(path: Path, colour: tuple[float, float, float], tolerance: float = 3.0) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return int((np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance).sum())


def band_colour(colour: tuple[int, int, int]) -> tuple[float, ...]:
    """The colour of a band of `colour` over the white background."""
    return tuple(BAND_ALPHA * c + (1 - BAND_ALPHA) * 255 for c in colour)


def report(spread: float) -> EvalReport:
    """Two methods, two tasks, K in 1, 2, 4, four episodes each with Dice 10K + n +- spread."""
    tasks = [("g", "a"), ("g", "b")]
    offsets = [-spread, spread, -spread, spread]
    scores = {
        m: {
            t: {k: CellScore([10.0 * k + n + d for d in offsets]) for k in (1, 2, 4)} for t in tasks
        }
        for n, m in enumerate(["x", "y"])
    }
    return EvalReport(
        ["x", "y"],
        [1, 2, 4],
        tasks,
        {"episodes": 4, "queries": 1, "seed": 0, "shots": [1, 2, 4]},
        scores,
    )


def test_dice_chart_draws_a_line_and_an_episode_band_per_method(tmp_path: Path) -> None:
    wide, flat = report(8.0), report(0.0)
    assert episode_spread(wide, "x", 2) == pytest.approx(np.std([-8, 8, -8, 8], ddof=1))
    assert episode_spread(flat, "x", 2) == 0.0
    for name, chart in (("wide", wide), ("flat", flat)):
        plot_dice_against_k(chart, tmp_path / f"{name}.png", "test")
        assert Image.open(tmp_path / f"{name}.png").size == SIZE
    for colour in PALETTE[:2]:
        assert colour_pixels(tmp_path / "wide.png", colour) > 50
        assert colour_pixels(tmp_path / "wide.png", band_colour(colour)) > 500  # the band
        assert colour_pixels(tmp_path / "flat.png", band_colour(colour)) < 50  # no spread, no band


def test_training_curve_and_bad_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    noise = np.random.default_rng(0).normal(0, 0.3, 300)
    log.write_text(
        "\n".join(
            json.dumps({"step": s, "loss": 2.0 / s + abs(noise[s - 1])}) for s in range(1, 301)
        )
        + "\n"
    )
    steps, losses = read_training_log(log)
    assert steps[-1] == 300 and losses[0] == pytest.approx(2.0 + abs(noise[0]))
    plot_training_curves({"run": log}, tmp_path / "curve.png", window=10)
    assert colour_pixels(tmp_path / "curve.png", PALETTE[0]) > 50
    assert colour_pixels(tmp_path / "curve.png", band_colour(PALETTE[0])) > 500
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl: no training steps logged"):
        read_training_log(tmp_path / "empty.jsonl")


def test_smooth_is_a_trailing_mean_and_moving_std_its_spread() -> None:
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(smooth(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_std(values, 2), [0.0, 1.0, 1.0, 1.0], atol=1e-12)


def test_without_matplotlib_the_flag_gets_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(
        PromptSegError, match=r"^--plot: charts need matplotlib: pip install 'promptseg\[plot\]'$"
    ):
        require_matplotlib("--plot")
