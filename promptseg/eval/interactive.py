"""The interactive measure (issue 18 item 4): a simulated user corrects the in-context prediction.

For each query of fixed episodes (`fixed_episodes`, as `promptseg eval`), after the prediction from
the K prompts, each round adds one click at the centre of the largest error region (the connected
component of prediction XOR truth with most pixels; its centre is the pixel farthest from the
component's border, by a Euclidean distance transform; of several, the one nearest the component's
centroid), positive on a missed region and negative on a false one. `--interactive-corrections`
says how a click corrects: "edit", a local edit of the probabilities
(`corrections.refine_probabilities`); "model", the query segmented again by a query-corrections
model with every click so far as input; "both", the two joined in logit space (the default for
such a model, as `Segmenter.refine` with prompts). `--interactive-user scribble` draws a stroke
instead of a click each round. Reported per task: Dice
(0-100) with no click and after each of ROUNDS rounds, and the mean number of clicks to reach 90%
Dice (0 when the prediction already does; CAP when 20 clicks do not).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from promptseg.data.episodes import fixed_episodes
from promptseg.data.tasks import ArrayTask
from promptseg.engine.corrections import (
    DEFAULT_SETTINGS,
    CorrectionSettings,
    refine_probabilities,
)
from promptseg.engine.model_corrections import combined
from promptseg.eval.baselines import Predictor
from promptseg.files import write_text
from promptseg.metrics import dice_percent

CAP = 20  # clicks at most, for clicks-to-90
TARGET = 90.0
CORRECTION_MODES = ("edit", "model", "both")
USERS = ("click", "scribble")


def largest_error(
    mask: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None:
    """The largest error region of a prediction (the component of mask XOR truth with most
    pixels; bool of the mask's shape), each pixel's depth in it (distance to its border, in
    `spacing` units) and its centre (the deepest pixel; of several, the one nearest the region's
    centroid); None when there is no error."""
    labelled, count = ndimage.label(mask ^ truth)
    if count == 0:
        return None
    region = labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))
    inner = tuple(slice(1, -1) for _ in region.shape)
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[inner]
    deepest = np.argwhere(depth == depth.max())
    centroid = np.argwhere(region).mean(axis=0)
    index = tuple(int(v) for v in deepest[int(np.argmin(((deepest - centroid) ** 2).sum(axis=1)))])
    return region, depth, index


def next_click(
    mask: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple | None:
    """The simulated user's click at the centre of the largest error region of a prediction, None
    when there is no error: (x, y, positive) on an (H, W) mask (x the column), (x, y, z, positive)
    = array[x, y, z] on a volume. spacing: voxel sizes for the distance transform (default 1)."""
    found = largest_error(mask, truth, spacing)
    if found is None:
        return None
    index = found[2]
    point = (index[1], index[0]) if mask.ndim == 2 else index
    return (*(float(v) for v in point), bool(truth[index]))


def next_scribble(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The simulated user's scribble on an (H, W) prediction, None when there is no error: a
    straight stroke through the centre of the largest error region along the region's long axis
    (its coordinates' first principal direction), over the pixels of the region at least half as
    deep as the centre (the region's core), as (strokes (H, W) bool, positive)."""
    found = largest_error(mask, truth)
    if found is None:
        return None
    region, depth, index = found
    points = np.argwhere(region).astype(np.float64)
    direction = np.array([1.0, 0.0])
    if len(points) > 1:
        direction = np.linalg.eigh(np.cov(points.T))[1][:, -1]
    core = depth >= 0.5 * depth[index]
    strokes = np.zeros(mask.shape, bool)
    strokes[index] = True
    for sign in (1.0, -1.0):
        for step in np.arange(0.5, float(max(mask.shape)), 0.5):
            row, column = np.round(np.asarray(index) + sign * step * direction).astype(int)
            if (
                not (0 <= row < mask.shape[0] and 0 <= column < mask.shape[1])
                or not core[row, column]
            ):
                break
            strokes[row, column] = True
    return strokes, bool(truth[index])


def click_curve(
    probabilities: np.ndarray,
    image: np.ndarray | None,
    truth: np.ndarray,
    rounds: int,
    settings: CorrectionSettings = DEFAULT_SETTINGS,
    decode: Callable[[list[tuple], list[tuple]], np.ndarray] | None = None,
    mode: str = "edit",
    user: str = "click",
) -> list[float]:
    """Dice after 0..rounds simulated corrections on one (H, W) query (a list of rounds + 1
    values); user (USERS): each round adds a click (`next_click`) or a scribble (`next_scribble`).

    mode (CORRECTION_MODES): "edit" applies each correction as a local edit of the
    probabilities so far; "model" segments the query again with every correction so far as input
    (decode(clicks, scribbles) -> (H, W) probabilities, a query-corrections model); "both" joins
    the two as `Segmenter.refine(..., prompts=...)` does (model_corrections.combined)."""
    current = edited = probabilities
    clicks: list[tuple] = []
    scribbles: list[tuple] = []
    curve = [dice_percent(current > 0.5, truth)]
    for _ in range(rounds):
        mask = current > 0.5
        made = next_click(mask, truth) if user == "click" else next_scribble(mask, truth)
        if made is not None:
            new_clicks, new_scribbles = ([made], []) if user == "click" else ([], [made])
            clicks += new_clicks
            scribbles += new_scribbles
            if mode != "model":
                edited = refine_probabilities(
                    edited, image, new_clicks, new_scribbles, settings=settings
                )
            if mode == "edit":
                current = edited
            elif mode == "model":
                current = decode(clicks, scribbles)
            else:
                current = combined(probabilities, edited, decode(clicks, scribbles))
        curve.append(dice_percent(current > 0.5, truth))
    return curve


def clicks_to_target(curve: Sequence[float], target: float = TARGET, cap: int = CAP) -> int:
    """The first number of clicks whose Dice reaches `target`, `cap` when none does."""
    return next((n for n, value in enumerate(curve[: cap + 1]) if value >= target), cap)


@dataclass
class InteractiveScore:
    """One task's curves: Dice after 0..R clicks per query, and clicks to 90% Dice per query."""

    curves: list[list[float]] = field(default_factory=list)
    clicks: list[int] = field(default_factory=list)

    def mean_curve(self) -> list[float]:
        return [float(v) for v in np.mean(np.asarray(self.curves), axis=0)]

    def mean_clicks(self) -> float:
        return float(np.mean(self.clicks))


def evaluate_interactive(
    predictor: Predictor,
    tasks: Sequence[ArrayTask],
    shots: int,
    episodes: int,
    rounds: int,
    queries: int = 4,
    seed: int = 0,
    progress: bool = True,
    settings: CorrectionSettings = DEFAULT_SETTINGS,
    mode: str = "edit",
    user: str = "click",
) -> dict[str, InteractiveScore]:
    """task name -> InteractiveScore over `episodes` fixed episodes of K = `shots` prompts; every
    query is clicked max(rounds, CAP) times so that clicks-to-90 is capped at CAP. mode: how a
    click corrects (`click_curve`); "model" and "both" need a predictor with `corrector(episode)`
    (ModelPredictor of a query-corrections model); user: clicks or scribbles (`click_curve`)."""
    scores: dict[str, InteractiveScore] = {}
    runnable = [t for t in tasks if len(t.nonempty()) >= shots + 1]
    bar = tqdm(
        total=len(runnable) * episodes, desc="interactive", unit="episode", disable=not progress
    )
    for task in runnable:
        score = scores.setdefault(task.name, InteractiveScore())
        for episode in fixed_episodes(
            task, shots=shots, queries=queries, count=episodes, seed=seed
        ):
            probabilities = predictor.predict(episode).float().cpu().numpy()
            images = episode.query_images.float().cpu().numpy().mean(axis=1)
            truths = episode.query_masks.cpu().numpy() > 0.5
            corrector = None if mode == "edit" else predictor.corrector(episode)
            for index, (p, image, truth) in enumerate(zip(probabilities, images, truths)):
                decode = (
                    None
                    if corrector is None
                    else lambda clicks, scribbles, i=index: corrector(i, clicks, scribbles).numpy()
                )
                curve = click_curve(p, image, truth, max(rounds, CAP), settings, decode, mode, user)
                score.curves.append(curve[: rounds + 1])
                score.clicks.append(clicks_to_target(curve))
            bar.update(1)
    bar.close()
    return scores


def to_markdown(
    scores: dict[str, InteractiveScore], rounds: int, shots: int, user: str = "click"
) -> str:
    """A table: per task, Dice with 0..rounds corrections (clicks or scribbles) and the mean number
    of them to 90% Dice, then the mean over tasks."""
    header = " | ".join(f"{n} {user}{'s' if n != 1 else ''}" for n in range(rounds + 1))
    lines = [
        (
            f"interactive, K={shots}: Dice after each simulated {user}; "
            f"{user}s to {TARGET:g}% Dice (cap {CAP})"
        ),
        "",
        f"| task | queries | {header} | {user}s to {TARGET:g} |",
        "|" + "---|" * (rounds + 4),
    ]
    for name, score in scores.items():
        curve = " | ".join(f"{v:.1f}" for v in score.mean_curve())
        lines.append(f"| {name} | {len(score.clicks)} | {curve} | {score.mean_clicks():.1f} |")
    if scores:
        mean = np.mean([s.mean_curve() for s in scores.values()], axis=0)
        clicks = np.mean([s.mean_clicks() for s in scores.values()])
        lines.append(
            f"| mean over tasks | | {' | '.join(f'{v:.1f}' for v in mean)} | {clicks:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_interactive(args: Any, predictor: Predictor, tasks: Sequence[ArrayTask]) -> int:
    """`promptseg eval --interactive ROUNDS`: score, print the table, write --out JSON and
    --markdown when asked."""
    shots = args.shots[0]
    scores = evaluate_interactive(
        predictor,
        tasks,
        shots,
        args.episodes,
        args.interactive,
        args.queries,
        args.seed,
        not args.no_progress,
        mode=args.interactive_corrections,
        user=args.interactive_user,
    )
    table = to_markdown(scores, args.interactive, shots, args.interactive_user)
    print(table)
    if args.out:
        report = {
            "shots": shots,
            "rounds": args.interactive,
            "episodes": args.episodes,
            "queries": args.queries,
            "seed": args.seed,
            "cap": CAP,
            "corrections": args.interactive_corrections,
            "user": args.interactive_user,
            "tasks": {
                name: {
                    "dice_per_round": s.mean_curve(),
                    "clicks_to_90": s.mean_clicks(),
                    "queries": len(s.clicks),
                }
                for name, s in scores.items()
            },
        }
        write_text(args.out, json.dumps(report, indent=2) + "\n", overwrite=args.overwrite)
    if args.markdown:
        write_text(args.markdown, table, overwrite=args.overwrite)
    return 0
