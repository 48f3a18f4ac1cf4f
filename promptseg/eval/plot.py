"""Line charts as PNG with Pillow: Dice against K for an eval report, and a training loss curve."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from promptseg.data.io import write_png
from promptseg.errors import InputError, short_reason
from promptseg.eval.evaluate import EvalReport
from promptseg.train.training_log import read_log_records

SIZE = (720, 440)
MARGIN = (70, 40, 190, 60)  # left, top, right, bottom
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # name -> (x values, y values)


def line_chart(series: Series, title: str, x_label: str, y_label: str, y_range: tuple[float, float] | None = None,
               x_ticks: Sequence[float] | None = None, log_x: bool = False) -> Image.Image:
    """An RGB chart of the named (x, y) series with axes, ticks and a legend on the right."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    xs_all = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys_all = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    transform = np.log2 if log_x else (lambda v: np.asarray(v, float))
    x_lo, x_hi = float(transform(xs_all).min()), float(transform(xs_all).max())
    y_lo, y_hi = y_range or (float(ys_all.min()), float(ys_all.max()))
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def point(x: float, y: float) -> tuple[float, float]:
        px = left + (float(transform(x)) - x_lo) / (x_hi - x_lo) * (right - left)
        return px, bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for tick in x_ticks if x_ticks is not None else np.linspace(xs_all.min(), xs_all.max(), 6):
        px, _ = point(tick, y_lo)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 8, bottom + 8), f"{tick:g}", fill="black", font=font)
    for tick in np.linspace(y_lo, y_hi, 6):
        _, py = point(float(transform(xs_all).min()) if not log_x else float(xs_all.min()), tick)
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left, py, right, py], fill=(230, 230, 230))
        draw.text((left - 44, py - 6), f"{tick:.3g}", fill="black", font=font)
    for n, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        points = [point(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points if len(points) <= 40 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([right + 12, top + 10 + 18 * n, right + 32, top + 10 + 18 * n], fill=colour, width=3)
        draw.text((right + 38, top + 4 + 18 * n), name, fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    draw.text(((left + right) // 2 - 20, SIZE[1] - 24), x_label, fill="black", font=font)
    draw.text((6, top - 20), y_label, fill="black", font=font)
    return image


def plot_dice_against_k(report: EvalReport, path: str | os.PathLike, title: str) -> None:
    """Mean Dice over tasks against K, one line per method."""
    series = {}
    for method in report.methods:
        points = [(k, report.mean_over_tasks(method, k)) for k in report.shots]
        points = [(k, cell[0]) for k, cell in points if cell is not None]
        series[method] = ([k for k, _ in points], [d for _, d in points])
    chart = line_chart(series, title, "prompts K (log scale)", "Dice", (0.0, 100.0), report.shots, log_x=True)
    write_png(path, np.asarray(chart), overwrite=True)


def read_training_log(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses), each (N,), from a run's log.jsonl (lines cut off by a crash skipped); InputError
    naming the file when it cannot be read or holds no steps."""
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


def plot_training_curves(logs: Mapping[str, str | os.PathLike], path: str | os.PathLike, window: int = 50) -> None:
    """Training loss (moving average over `window` steps) of each named run's log.jsonl."""
    series = {}
    for name, log in logs.items():
        steps, losses = read_training_log(log)
        every = max(1, len(steps) // 400)
        series[name] = (steps[::every], smooth(losses, window)[::every])
    last = max(int(steps[-1]) for steps, _ in series.values())
    ticks = np.linspace(0, last, 6).round(-2 if last >= 1000 else 0)
    chart = line_chart(series, f"training loss (moving average over {window} steps)", "step", "loss", x_ticks=ticks)
    write_png(path, np.asarray(chart), overwrite=True)
