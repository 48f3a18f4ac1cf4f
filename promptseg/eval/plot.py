"""Line charts as PNG with matplotlib (the `plot` extra): Dice against K for an eval report, with
the spread over episodes as a band, and training loss curves, with the spread over the smoothing
window as a band.

matplotlib is imported only when a chart is drawn (with the non-interactive Agg backend);
require_matplotlib() turns its absence into one line naming the flag that asked for a chart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from promptseg.errors import InputError, PromptSegError, short_reason
from promptseg.eval.evaluate import EvalReport
from promptseg.files import atomic_write
from promptseg.train.training_log import read_log_records

SIZE = (720, 440)  # pixels (at DPI)
DPI = 100
PALETTE = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
)
BAND_ALPHA = 0.2


class Series(NamedTuple):
    """One line of a chart: x (N,), y (N,) and the half-width of its band (N,) or None."""

    x: np.ndarray
    y: np.ndarray
    spread: np.ndarray | None = None


def require_matplotlib(flag: str = "--plot") -> Any:
    """matplotlib.pyplot (Agg backend); PromptSegError naming `flag` when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PromptSegError(
            f"{flag}: charts need matplotlib: pip install 'promptseg[plot]'"
        ) from None
    return plt


def save_chart(
    series: Mapping[str, Series],
    path: str | os.PathLike,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    x_ticks: Sequence[float] | None = None,
    log_x: bool = False,
    band_label: str | None = None,
) -> None:
    """Write a PNG of SIZE pixels: each named series as a line with markers and, where it has a
    spread, a band of y +- spread; the legend names the lines (and says what the band is)."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    try:
        for n, (name, line) in enumerate(series.items()):
            colour = tuple(c / 255 for c in PALETTE[n % len(PALETTE)])
            marker = "o" if len(line.x) <= 40 else None
            axes.plot(
                line.x, line.y, color=colour, linewidth=2.5, marker=marker, markersize=5, label=name
            )
            if line.spread is not None:
                axes.fill_between(
                    line.x,
                    line.y - line.spread,
                    line.y + line.spread,
                    color=colour,
                    alpha=BAND_ALPHA,
                    linewidth=0,
                )
        if log_x:
            axes.set_xscale("log", base=2)
        if x_ticks is not None:
            axes.set_xticks(list(x_ticks), [f"{t:g}" for t in x_ticks])
            axes.minorticks_off()
        if y_range is not None:
            axes.set_ylim(*y_range)
        axes.set_title(title, fontsize=12)
        axes.set_xlabel(x_label, fontsize=11)
        axes.set_ylabel(y_label, fontsize=11)
        axes.grid(True, color=(0.9, 0.9, 0.9))
        axes.legend(fontsize=9, title=band_label, title_fontsize=8, loc="best")
        figure.tight_layout()
        atomic_write(
            path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI), overwrite=True
        )
    finally:
        plt.close(figure)


def episode_spread(report: EvalReport, method: str, shots: int) -> float | None:
    """Mean over tasks of the standard deviation of Dice over episodes at K = shots (how much one
    draw of prompts moves a task's Dice); None when no task ran at that K."""
    cells = [cells[shots] for cells in report.scores[method].values() if shots in cells]
    return float(np.mean([cell.std for cell in cells])) if cells else None


def plot_dice_against_k(report: EvalReport, path: str | os.PathLike, title: str) -> None:
    """Mean Dice over tasks against K, one line per method, each with a band of +- the mean over
    tasks of the standard deviation over episodes."""
    series = {}
    for method in report.methods:
        points = [
            (k, report.mean_over_tasks(method, k), episode_spread(report, method, k))
            for k in report.shots
        ]
        points = [(k, cell[0], spread) for k, cell, spread in points if cell is not None]
        series[method] = Series(*(np.array([p[i] for p in points], float) for i in range(3)))
    save_chart(
        series,
        path,
        title,
        "prompts K (log scale)",
        "Dice (%)",
        (0.0, 100.0),
        report.shots,
        log_x=True,
        band_label="band: ± std over episodes (mean over tasks)",
    )


def read_training_log(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses), each (N,), from a run's log.jsonl (lines cut off by a crash skipped);
    InputError naming the file when it cannot be read or holds no steps."""
    try:
        records = read_log_records(path)
    except OSError as exc:
        raise InputError(path, f"unreadable training log ({short_reason(exc)})") from None
    steps = [r for r in records if "loss" in r and "step" in r]
    if not steps:
        raise InputError(path, "no training steps logged")
    return np.array([r["step"] for r in steps]), np.array([r["loss"] for r in steps])


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over `window` values (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def moving_std(values: np.ndarray, window: int) -> np.ndarray:
    """Standard deviation over the trailing windows of smooth() (0 for a window of one value)."""
    mean = smooth(values, window)
    return np.sqrt(np.maximum(smooth(values.astype(float) ** 2, window) - mean**2, 0.0))


def plot_training_curves(
    logs: Mapping[str, str | os.PathLike], path: str | os.PathLike, window: int = 50
) -> None:
    """Training loss (moving average over `window` steps) of each named run's log.jsonl, with a band
    of +- the standard deviation of the loss over the same window."""
    series = {}
    for name, log in logs.items():
        steps, losses = read_training_log(log)
        every = max(1, len(steps) // 400)
        series[name] = Series(
            steps[::every], smooth(losses, window)[::every], moving_std(losses, window)[::every]
        )
    save_chart(
        series,
        path,
        f"training loss (moving average over {window} steps)",
        "step",
        "loss",
        band_label=f"band: ± std over {window} steps",
    )
