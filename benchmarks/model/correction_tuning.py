"""Tune the query corrections offline (issue 18): the model's predictions are stored once, then the
simulated clicks of `eval --interactive` are replayed on them for any correction settings.

The episodes are those of `promptseg eval --interactive` (fixed_episodes, same seed, K = --shots),
so a stored file replays exactly what eval scores. Tune on training datasets only (`--cases held`:
their cases kept out of training), then report the held-out datasets once with `eval`.

    # 1. store predictions (one model pass per episode)
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/model/correction_tuning.py store \
        --data ../shared/data/busi ../shared/data/kvasir --cases held --out /tmp/train.npz
    # 2. replay clicks with settings given as NAME=VALUE (fields of CorrectionSettings)
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/model/correction_tuning.py score \
        /tmp/train.npz --set reach=2 tolerance=1 --set reach=3 tolerance=1.5
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from promptseg.cli.common import resolve_device
from promptseg.cli.train import dataset_folders
from promptseg.data.episodes import fixed_episodes
from promptseg.data.index import build_tasks
from promptseg.engine.corrections import DEFAULT_SETTINGS, CorrectionSettings
from promptseg.eval.baselines import ModelPredictor
from promptseg.eval.interactive import CAP, click_curve, clicks_to_target
from promptseg.model.weights import load_model, packaged_weights_path


def store(args: argparse.Namespace) -> None:
    """Run the model on every fixed episode and save (task, probabilities, image, truth) per
    query: arrays (N, R, R) and task names (N,)."""
    model = load_model(packaged_weights_path())
    device = resolve_device(None)
    predictor = ModelPredictor(model, device)
    tasks = build_tasks(
        dataset_folders(args.data, []),
        model.config.resolution,
        model.config.in_channels,
        progress=False,
        cache_dir=args.cache,
        cases=args.cases,
    )
    names, probabilities, images, truths = [], [], [], []
    for task in tasks:
        if len(task.nonempty()) < args.shots + 1:
            continue
        for episode in fixed_episodes(
            task, shots=args.shots, queries=args.queries, count=args.episodes, seed=args.seed
        ):
            p = predictor.predict(episode).float().cpu().numpy()
            probabilities.append(p)
            images.append(episode.query_images.float().cpu().numpy().mean(axis=1))
            truths.append(episode.query_masks.cpu().numpy() > 0.5)
            names += [task.name] * len(p)
        print(task.name, flush=True)
    np.savez_compressed(
        args.out,
        names=np.asarray(names),
        probabilities=np.concatenate(probabilities).astype(np.float16),
        images=np.concatenate(images).astype(np.float16),
        truths=np.concatenate(truths),
    )


def parse_settings(items: list[str]) -> CorrectionSettings:
    """NAME=VALUE items -> CorrectionSettings (the defaults for the rest)."""
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        values[name] = type(getattr(DEFAULT_SETTINGS, name))(float(value))
    return dataclasses.replace(DEFAULT_SETTINGS, **values)


def score(args: argparse.Namespace) -> None:
    """Print, per settings, the mean over tasks of Dice after 0..3 clicks and of clicks to 90."""
    stored = np.load(args.file)
    names = stored["names"]
    sets = args.set or [[]]
    for items in sets:
        settings = parse_settings(items)
        per_task: dict[str, list[tuple[list[float], int]]] = {}
        for n in range(len(names)):
            if args.task and names[n] not in args.task:
                continue
            curve = click_curve(
                stored["probabilities"][n].astype(np.float32),
                stored["images"][n].astype(np.float32),
                stored["truths"][n],
                CAP,
                settings,
            )
            per_task.setdefault(str(names[n]), []).append((curve[:4], clicks_to_target(curve)))
        rows = {
            t: (np.mean([c for c, _ in v], axis=0), np.mean([k for _, k in v]))
            for t, v in per_task.items()
        }
        curve = np.mean([r[0] for r in rows.values()], axis=0)
        clicks = np.mean([r[1] for r in rows.values()])
        print(
            f"{' '.join(items) or 'defaults'}: Dice 0-3 clicks "
            f"{' '.join(f'{v:.1f}' for v in curve)} (+{curve[3] - curve[0]:.1f}), "
            f"clicks to 90 {clicks:.2f}",
            flush=True,
        )
        if args.per_task:
            for t, (c, k) in rows.items():
                print(f"    {t}: {' '.join(f'{v:.1f}' for v in c)} (+{c[3] - c[0]:.1f}), {k:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keep = commands.add_parser("store", help="store the model's predictions")
    keep.add_argument("--data", nargs="+", required=True)
    keep.add_argument("--cases", default="held")
    keep.add_argument("--cache", default="/work/cache/packed")
    keep.add_argument("--shots", type=int, default=4)
    keep.add_argument("--episodes", type=int, default=3)
    keep.add_argument("--queries", type=int, default=4)
    keep.add_argument("--seed", type=int, default=0)
    keep.add_argument("--out", required=True)
    replay = commands.add_parser("score", help="replay the simulated clicks")
    replay.add_argument("file")
    replay.add_argument("--set", nargs="*", action="append", metavar="NAME=VALUE")
    replay.add_argument("--task", nargs="*", help="only these task names")
    replay.add_argument("--per-task", action="store_true")
    args = parser.parse_args()
    store(args) if args.command == "store" else score(args)


if __name__ == "__main__":
    main()
