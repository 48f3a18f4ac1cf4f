"""Few-shot evaluation: Dice of several predictors on identical fixed episodes (docs/design.md
section 8).

For every task and K, `fixed_episodes` is built once and every predictor sees the same episodes,
so the rows of the report are directly comparable (and per-episode scores are paired).
Dice is on a 0-100 scale: hard Dice of probabilities > 0.5 (or the threshold a predictor gives with
them, promptseg.eval.prediction: a shifted ensemble's) against the mask, 100 when both are empty,
averaged over the queries of an episode; a (method, task, K) cell reports the mean and the sample
standard deviation (ddof = 1; 0 for a single episode) over episodes.

Calibration, for every method: the expected calibration error (`expected_calibration_error`, 0-100)
of each episode's query pixels, averaged like Dice; and the Pearson correlation, over every query
of a method at one K, between the query's mean predictive entropy (bits) and its error 1 - Dice
(a positive correlation: the model knows when it fails).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from promptseg.data.episodes import CHANNELS, Episode, fixed_episodes
from promptseg.data.tasks import ArrayTask
from promptseg.errors import InputError
from promptseg.eval.baselines import Predictor
from promptseg.eval.prediction import predict
from promptseg.metrics import expected_calibration_error, mean_entropy, query_dice


def correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences; None with fewer than 2 values or when one
    is constant."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class CellScore:
    """Per-episode Dice and ECE (0-100) of one method on one task at one K, and per query its mean
    predictive entropy (bits) and error (1 - Dice / 100). Reports written before calibration was
    scored load with the last three empty."""

    dice: list[float]
    ece: list[float] = field(default_factory=list)
    query_entropy: list[float] = field(default_factory=list)
    query_error: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.dice))

    @property
    def std(self) -> float:
        return float(np.std(self.dice, ddof=1)) if len(self.dice) > 1 else 0.0

    @property
    def mean_ece(self) -> float | None:
        return float(np.mean(self.ece)) if self.ece else None

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "episodes": len(self.dice),
            "dice": self.dice,
            "ece": self.ece,
            "query_entropy": self.query_entropy,
            "query_error": self.query_error,
        }

    @classmethod
    def from_json(cls, cell: Mapping[str, Any]) -> CellScore:
        return cls(
            list(cell["dice"]),
            list(cell.get("ece", [])),
            list(cell.get("query_entropy", [])),
            list(cell.get("query_error", [])),
        )


@dataclass
class EvalReport:
    """Scores keyed scores[method][(group, task)][K]; skipped (task, K) pairs are listed in
    `skipped`."""

    methods: list[str]
    shots: list[int]
    tasks: list[tuple[str, str]]  # (group, task name), in evaluation order
    settings: dict[str, Any]
    scores: dict[str, dict[tuple[str, str], dict[int, CellScore]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # prediction time per method
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def mean_over_tasks(self, method: str, shots: int) -> tuple[float, float, int] | None:
        """(mean, std over tasks, number of tasks) of the per-task means at K = shots; None when
        none ran."""
        means = [cells[shots].mean for cells in self.scores[method].values() if shots in cells]
        if not means:
            return None
        return (
            float(np.mean(means)),
            float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            len(means),
        )

    def calibration(self, method: str, shots: int) -> tuple[float | None, float | None]:
        """(mean over tasks of the per-task mean ECE, correlation of mean entropy and error over
        every query of every task) at K = shots; None where nothing was scored."""
        cells = [cells[shots] for cells in self.scores[method].values() if shots in cells]
        eces = [c.mean_ece for c in cells if c.mean_ece is not None]
        entropy = [v for c in cells for v in c.query_entropy]
        error = [v for c in cells for v in c.query_error]
        return (float(np.mean(eces)) if eces else None), correlation(entropy, error)

    def dataset_means(self, method: str, shots: int) -> dict[str, float]:
        """{dataset (group): mean over its tasks of the per-task mean Dice at K = shots}, in task
        order."""
        by_group: dict[str, list[float]] = {}
        for (group, _), cells in self.scores[method].items():
            if shots in cells:
                by_group.setdefault(group, []).append(cells[shots].mean)
        return {group: float(np.mean(values)) for group, values in by_group.items()}

    def episodes_run(self, method: str) -> int:
        return sum(
            len(cell.dice) for cells in self.scores[method].values() for cell in cells.values()
        )

    def to_json(self) -> dict[str, Any]:
        """{"settings", "skipped", "methods": {method: {"tasks": [{"group", "task", "shots": {"K":
        cell}}], "mean_over_tasks": {"K": {"mean", "std", "tasks"}}, "seconds_per_episode"}}} (K as
        strings)."""
        methods = {}
        for method in self.methods:
            rows = [
                {
                    "group": group,
                    "task": name,
                    "shots": {str(k): cell.to_json() for k, cell in cells.items()},
                }
                for (group, name), cells in self.scores[method].items()
            ]
            summary = {}
            for k in self.shots:
                overall = self.mean_over_tasks(method, k)
                if overall is not None:
                    ece, corr = self.calibration(method, k)
                    summary[str(k)] = {
                        "mean": overall[0],
                        "std": overall[1],
                        "tasks": overall[2],
                        "ece": ece,
                        "uncertainty_error_correlation": corr,
                    }
            runs = self.episodes_run(method)
            methods[method] = {
                "tasks": rows,
                "mean_over_tasks": summary,
                "seconds_per_episode": self.seconds.get(method, 0.0) / runs if runs else None,
            }
        return {"settings": self.settings, "skipped": self.skipped, "methods": methods}

    def to_markdown(self) -> str:
        """A summary table (method x K, mean over tasks) and, per method, a task x K table of mean ±
        std."""
        header = "| {} | " + " | ".join(f"K={k}" for k in self.shots) + " |"
        rule = "|---|" + "---:|" * len(self.shots)
        kind = self.settings.get("prompt_kind", "mask")
        scored = (
            "the prompted images themselves"
            if self.settings.get("query_prompts")
            else f"{self.settings['queries']} queries each"
        )
        lines = [
            (
                f"Dice (0-100); {self.settings['episodes']} episodes, {scored}, {kind} prompts, "
                f"seed {self.settings['seed']}."
            ),
            "",
            "Mean over tasks (number of tasks):",
            "",
            header.format("method"),
            rule,
        ]
        for method in self.methods:
            cells = [self.mean_over_tasks(method, k) for k in self.shots]
            lines.append(
                f"| {method} | "
                + " | ".join("–" if c is None else f"{c[0]:.1f} ({c[2]})" for c in cells)
                + " |"
            )
        lines += self._calibration_table()
        lines += self._dataset_table()
        for method in self.methods:
            lines += ["", f"{method} (mean ± std over episodes):", "", header.format("task"), rule]
            for group, name in self.tasks:
                cells = self.scores[method].get((group, name), {})
                values = [
                    "–" if k not in cells else f"{cells[k].mean:.1f} ± {cells[k].std:.1f}"
                    for k in self.shots
                ]
                lines.append(f"| {name} | " + " | ".join(values) + " |")
        if self.skipped:
            lines += ["", "Skipped:"] + [
                f"- {s['task']} K={s['shots']}: {s['reason']}" for s in self.skipped
            ]
        return "\n".join(lines) + "\n"

    def _calibration_table(self) -> list[str]:
        """Per method and K: mean ECE over tasks / correlation of mean entropy and error over
        queries."""
        lines = [
            "",
            (
                "Calibration: expected calibration error (0-100, mean over tasks) / correlation of "
                "a query's "
                "mean entropy with its error:"
            ),
            "",
            "| method | " + " | ".join(f"K={k}" for k in self.shots) + " |",
            "|---|" + "---:|" * len(self.shots),
        ]
        for method in self.methods:
            cells = [self.calibration(method, k) for k in self.shots]
            text = [
                " / ".join("–" if v is None else f"{v:.{digits}f}" for v, digits in zip(c, (1, 2)))
                for c in cells
            ]
            lines.append(f"| {method} | " + " | ".join(text) + " |")
        return lines

    def _dataset_table(self) -> list[str]:
        """Per dataset (mean over its labels) and K, the methods' Dice side by side, then the mean
        over datasets (each dataset weighted alike)."""
        means = {m: {k: self.dataset_means(m, k) for k in self.shots} for m in self.methods}
        groups = list(dict.fromkeys(group for group, _ in self.tasks))
        lines = [
            "",
            f"Per dataset, mean over its labels ({' / '.join(self.methods)}):",
            "",
            "| dataset | " + " | ".join(f"K={k}" for k in self.shots) + " |",
            "|---|" + "---:|" * len(self.shots),
        ]
        rows = [
            (g, [[means[m][k].get(g) for m in self.methods] for k in self.shots]) for g in groups
        ]
        overall = [
            [
                float(np.mean(list(means[m][k].values()))) if means[m][k] else None
                for m in self.methods
            ]
            for k in self.shots
        ]
        for name, cells in [*rows, ("**mean over datasets**", overall)]:
            text = [" / ".join("–" if v is None else f"{v:.1f}" for v in cell) for cell in cells]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
        return lines

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalReport:
        """Inverse of `to_json` (per-method seconds are rebuilt from seconds_per_episode)."""
        settings = dict(data["settings"])
        methods = list(data["methods"])
        scores: dict[str, dict[tuple[str, str], dict[int, CellScore]]] = {}
        seconds: dict[str, float] = {}
        tasks: list[tuple[str, str]] = []
        for method, body in data["methods"].items():
            scores[method] = {
                (row["group"], row["task"]): {
                    int(k): CellScore.from_json(cell) for k, cell in row["shots"].items()
                }
                for row in body["tasks"]
            }
            tasks += [key for key in scores[method] if key not in tasks]
            runs = sum(len(c.dice) for cells in scores[method].values() for c in cells.values())
            seconds[method] = (body.get("seconds_per_episode") or 0.0) * runs
        return cls(
            methods,
            list(settings["shots"]),
            tasks,
            settings,
            scores,
            seconds,
            list(data.get("skipped", [])),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        """Read a report written by `write`; InputError naming the file when it is not one."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise InputError(path, "file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                path, f"not a promptseg eval report ({type(exc).__name__}: {exc})"
            ) from None

    def check_same_episodes(
        self, settings: Mapping[str, Any], source: str | os.PathLike | None
    ) -> None:
        """InputError naming `source` unless this report drew its episodes as `settings` describe
        (same episodes, queries, seed and shots: then a task's episodes are identical in both)."""
        defaults = {
            "prompt_kind": "mask",
            "query_prompts": False,
        }  # reports written before these settings
        for key in ("episodes", "queries", "seed", "shots", "prompt_kind", "query_prompts"):
            if self.settings.get(key, defaults.get(key)) != settings.get(key, defaults.get(key)):
                raise InputError(
                    source,
                    f"was evaluated with {key}={self.settings.get(key)}, this run uses "
                    f"{settings.get(key)}",
                )

    def merged(self, other: EvalReport, source: str | os.PathLike | None = None) -> EvalReport:
        """The union of two reports of the same episode settings: other methods, other tasks or
        both.

        InputError naming `source` when the settings differ or both reports scored the same method
        on the same task (the cells would be ambiguous).
        """
        other.check_same_episodes(self.settings, source)
        methods = self.methods + [m for m in other.methods if m not in self.methods]
        tasks = self.tasks + [t for t in other.tasks if t not in self.tasks]
        scores = {m: dict(self.scores.get(m, {})) for m in methods}
        for method, cells in other.scores.items():
            for task, by_shots in cells.items():
                if task in scores[method]:
                    raise InputError(
                        source,
                        f"scores {method} on {task[1]} again; merge reports of different methods "
                        "or tasks",
                    )
                scores[method][task] = by_shots
        seconds = {m: self.seconds.get(m, 0.0) + other.seconds.get(m, 0.0) for m in methods}
        settings = {**self.settings, "methods": methods, "tasks": len(tasks)}
        skipped = self.skipped + [s for s in other.skipped if s not in self.skipped]
        return EvalReport(methods, self.shots, tasks, settings, scores, seconds, skipped)

    def write(self, path: str | os.PathLike) -> None:
        """Write `to_json()` to `path` atomically (temporary file beside it, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.to_json(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def evaluate(
    predictors: Mapping[str, Predictor],
    tasks: Sequence[ArrayTask],
    shots: Sequence[int],
    episodes: int,
    queries: int = 4,
    seed: int = 0,
    progress: bool = True,
    prompt_kind: str = "mask",
    query_prompts: bool = False,
    channels: int = CHANNELS,
) -> EvalReport:
    """Score every predictor on `episodes` fixed episodes per task and K (the same episodes for
    all).

    A task with fewer than K + 1 non-empty examples is skipped at that K, with a note in `skipped`.
    Predictors return (Q, R, R) probabilities; see the module docstring for the Dice convention.
    `prompt_kind` and `query_prompts` are passed to `fixed_episodes` (sparse prompts; scoring the
    prompted images themselves) and recorded in the settings; episode images have `channels`
    channels (the model's in_channels).
    """
    report = EvalReport(
        methods=list(predictors),
        shots=list(shots),
        tasks=[(task.group, task.name) for task in tasks],
        settings={
            "episodes": episodes,
            "queries": queries,
            "seed": seed,
            "shots": list(shots),
            "methods": list(predictors),
            "tasks": len(tasks),
            "prompt_kind": prompt_kind,
            "query_prompts": query_prompts,
        },
        scores={method: {} for method in predictors},
        seconds={method: 0.0 for method in predictors},
    )
    runnable = [(task, k) for task in tasks for k in shots if len(task.nonempty()) >= k + 1]
    bar = tqdm(
        total=len(runnable) * episodes * len(predictors),
        desc="eval",
        unit="episode",
        disable=not progress,
    )
    for task in tasks:
        available = len(task.nonempty())
        for k in shots:
            if available < k + 1:
                report.skipped.append(
                    {
                        "group": task.group,
                        "task": task.name,
                        "shots": k,
                        "reason": f"{available} non-empty examples, need at least {k + 1}",
                    }
                )
                continue
            bar.set_postfix_str(f"{task.name} K={k}")
            drawn = fixed_episodes(
                task,
                shots=k,
                queries=queries,
                count=episodes,
                seed=seed,
                prompt_kind=prompt_kind,
                query_prompts=query_prompts,
                channels=channels,
            )
            for method, predictor in predictors.items():
                cell, elapsed = _run(predictor, drawn, bar)
                report.scores[method].setdefault((task.group, task.name), {})[k] = cell
                report.seconds[method] += elapsed
    bar.close()
    return report


def _run(predictor: Predictor, drawn: Sequence[Episode], bar: tqdm) -> tuple[CellScore, float]:
    """The scores of `predictor` on `drawn` and its total prediction time (s); advances the bar."""
    cell, elapsed = CellScore([]), 0.0
    for episode in drawn:
        start = time.perf_counter()
        prediction = predict(predictor, episode)
        elapsed += time.perf_counter() - start
        probs, masks = prediction.probabilities.float().cpu(), episode.query_masks.float().cpu()
        dice = query_dice(probs, masks, prediction.threshold)
        cell.dice.append(float(dice.mean()))
        cell.ece.append(expected_calibration_error(probs, masks))
        cell.query_entropy += mean_entropy(probs).tolist()
        cell.query_error += (1.0 - dice / 100.0).tolist()
        bar.update(1)
    return cell, elapsed
