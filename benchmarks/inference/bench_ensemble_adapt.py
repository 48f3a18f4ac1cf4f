"""Inference-time spending benchmark (issue 13): CPU time per query of plain, --ensemble N and
--adapt STEPS.

Run from the repository root (2 threads by default; add `nice -n 10` on a shared machine):

    python -m benchmarks.inference.bench_ensemble_adapt                   # K = 1 and 8, 5 episodes
    each python -m benchmarks.inference.bench_ensemble_adapt --shots 8 --episodes 3 --settings plain
    ens4

Two figures per setting and K, both medians over episodes of a synthetic task at the packaged
model's resolution (timings do not depend on image content). The settings take turns within every
repeat, so that load from other processes on a shared machine falls on all of them alike:
- episode: `ModelPredictor.predict` on an episode of K prompts and 4 queries, as `promptseg eval`
  times it (prompt encoding, ensemble calibration or adaptation included), divided by 4;
- cached: `Segmenter.segment` of 16 queries against a prompt set already encoded (and adapted),
  divided by 16: the cost per slice of a long volume, where the prompt set is paid once.
Results go to benchmarks/results/inference-ensemble-adapt-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from promptseg.data.episodes import Episode, fixed_episodes
from promptseg.data.synthetic import synthetic_task
from promptseg.engine.adaptation import Adaptation
from promptseg.engine.segmenter import Segmenter
from promptseg.eval.baselines import ModelPredictor
from promptseg.model.weights import load_model, packaged_weights_path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
SETTINGS = {  # name -> (ensemble members, adaptation steps)
    "plain": (1, 0),
    "ens4": (4, 0),
    "ens8": (8, 0),
    "adapt20": (1, 20),
    "adapt50": (1, 50),
    "adapt20+ens4": (4, 20),
}
QUERIES_PER_EPISODE = 4
CACHED_QUERIES = 16


def episodes(resolution: int, shots: int, count: int) -> list[Episode]:
    """`count` fixed episodes (K = shots, 4 queries) of one synthetic RGB task."""
    task = synthetic_task(
        np.random.default_rng(0), resolution, shots + QUERIES_PER_EPISODE + 8, channels=3
    )
    return fixed_episodes(task, shots=shots, queries=QUERIES_PER_EPISODE, count=count, seed=0)


def episode_seconds(
    predictors: dict[str, ModelPredictor], drawn: list[Episode]
) -> dict[str, float]:
    """Median seconds per query of each predictor.predict over the episodes, the predictors in turn
    on every episode (one untimed warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for predictor in predictors.values():
        predictor.predict(drawn[0])
    for episode in drawn:
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict(episode)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) / QUERIES_PER_EPISODE for name, t in times.items()}


def channels_last(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) array, as a user's image arrives."""
    return image.permute(1, 2, 0).numpy()


def cached_seconds(
    segmenters: dict[str, Segmenter], episode: Episode, repeats: int
) -> dict[str, float]:
    """Median seconds per query of segmenting CACHED_QUERIES queries against a prompt set encoded
    (and adapted) once, the segmenters in turn on every repeat."""
    queries = np.stack(
        [
            channels_last(episode.query_images[n % len(episode.query_images)])
            for n in range(CACHED_QUERIES)
        ]
    )
    prompts = {}
    for name, segmenter in segmenters.items():
        prompts[name] = segmenter.encode_prompts(
            [channels_last(i) for i in episode.prompt_images],
            [m.numpy().astype(np.uint8) for m in episode.prompt_maps],
        )
        segmenter.segment(queries, prompts[name])
    times: dict[str, list[float]] = {name: [] for name in segmenters}
    for _ in range(repeats):
        for name, segmenter in segmenters.items():
            start = time.perf_counter()
            segmenter.segment(queries, prompts[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) / CACHED_QUERIES for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 8], metavar="K")
    parser.add_argument(
        "--episodes", type=int, default=5, help="timed episodes (and cached repeats) per cell"
    )
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(packaged_weights_path()).eval()
    rows = []
    for shots in args.shots:
        drawn = episodes(model.config.resolution, shots, args.episodes)
        adaptations = {
            name: Adaptation(SETTINGS[name][1]) if SETTINGS[name][1] else None
            for name in args.settings
        }
        per_episode = episode_seconds(
            {
                name: ModelPredictor(model, "cpu", adaptations[name], SETTINGS[name][0])
                for name in args.settings
            },
            drawn,
        )
        per_slice = cached_seconds(
            {
                name: Segmenter(
                    model,
                    device="cpu",
                    backend="torch",
                    ensemble=SETTINGS[name][0],
                    adaptation=adaptations[name],
                )
                for name in args.settings
            },
            drawn[0],
            args.episodes,
        )
        for name in args.settings:
            rows.append(
                {
                    "setting": name,
                    "shots": shots,
                    "episode_seconds_per_query": per_episode[name],
                    "cached_seconds_per_query": per_slice[name],
                }
            )
            print(
                f"K={shots:2d} {name:13s} episode {per_episode[name] * 1e3:8.1f} ms/query   "
                f"cached {per_slice[name] * 1e3:7.1f} ms/query",
                flush=True,
            )
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "resolution": model.config.resolution,
        "episodes": args.episodes,
        "rows": rows,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "inference-ensemble-adapt-cpu.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )
    plain = {r["shots"]: r for r in rows if r["setting"] == "plain"}
    lines = [
        (
            f"CPU ({record['cpu']}, {args.threads} threads), {record['date']}; ms per query, "
            "median over "
            f"{args.episodes} episodes; x = against plain at the same K."
        ),
        "",
        "| setting | K | episode (eval) | x | cached prompt set | x |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = plain.get(r["shots"])
        cells = []
        for key in ("episode_seconds_per_query", "cached_seconds_per_query"):
            cells += [f"{r[key] * 1e3:.1f}", f"{r[key] / base[key]:.1f}" if base else "–"]
        lines.append(f"| {r['setting']} | {r['shots']} | " + " | ".join(cells) + " |")
    (RESULTS_DIR / "inference-ensemble-adapt-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
