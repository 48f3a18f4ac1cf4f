"""Batch throughput (issue 19 targets): `promptseg batch` against one `promptseg segment` call, and
the Ray engine on two local workers against one.

Run from the repository root (packaged weights, CPU):

    python -m benchmarks.engine.batch_throughput                 # 100 2D jobs over 4 prompt sets
    python -m benchmarks.engine.batch_throughput --ray           # also --engine ray, 1 and 2
    workers
    python -m benchmarks.engine.batch_throughput --ray-only      # only the Ray timings (c) and (d)

Timed, each in a fresh output folder, end to end through the CLI in this process (model loading
included, once per run): (a) `promptseg segment` over the N query PNGs with one prompt set of K
pairs; (b) `promptseg batch` over N jobs on the same queries, the jobs spread over P prompt sets of
K pairs (the target: (b) at least 90% of (a)'s queries per second); with --ray, (c) `--engine ray
--workers 1` and (d) `--workers 2` (target: (d) at least 1.6x (c)). Ray's start-up is inside the
Ray timings. Results print as one JSON object; nothing is written unless --out-json is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from promptseg.cli import main


def disk(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) uint8 image with a bright disk and its 0/255 mask."""
    ys, xs = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= (rng.uniform(0.15, 0.25) * size) ** 2
    image = np.clip(60 + 120 * mask + rng.normal(0, 15, mask.shape), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    status = main(argv)
    if status != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed with status {status}")
    return time.perf_counter() - start


def run(
    jobs: int, prompt_sets: int, shots: int, size: int, ray: bool, local: bool = True
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    sets = []
    for s in range(prompt_sets):
        pairs = []
        for k in range(shots):
            image, mask = disk(rng, size)
            Image.fromarray(image).save(root / f"s{s}p{k}.png")
            Image.fromarray(mask).save(root / f"s{s}p{k}_mask.png")
            pairs.append([f"s{s}p{k}.png", f"s{s}p{k}_mask.png"])
        sets.append(pairs)
    for n in range(jobs):
        Image.fromarray(disk(rng, size)[0]).save(root / f"q{n}.png")
    (root / "jobs.jsonl").write_text(
        "".join(
            json.dumps({"query": f"q{n}.png", "prompts": sets[n % prompt_sets]}) + "\n"
            for n in range(jobs)
        )
    )
    common = ["--device", "cpu", "--no-progress"]
    segment = [
        "segment",
        "--query",
        *[str(root / f"q{n}.png") for n in range(jobs)],
        "--out",
        str(root / "segment"),
    ]
    for image, mask in sets[0]:
        segment += ["--prompt", str(root / image), str(root / mask)]
    figures: dict[str, float] = {}
    if local:
        figures["segment_s"] = timed(segment + common)
        batch = ["batch", str(root / "jobs.jsonl"), "--out", str(root / "batch"), *common]
        figures["batch_s"] = timed(batch)
        figures["batch_vs_segment"] = figures["segment_s"] / figures["batch_s"]
    if ray:
        for workers in (1, 2):
            figures[f"ray{workers}_s"] = timed(
                [
                    "batch",
                    str(root / "jobs.jsonl"),
                    "--out",
                    str(root / f"ray{workers}"),
                    "--engine",
                    "ray",
                    "--workers",
                    str(workers),
                    *common,
                ]
            )
        figures["ray2_vs_ray1"] = figures["ray1_s"] / figures["ray2_s"]
    return {key: round(value, 3) for key, value in figures.items()}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--prompt-sets", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4, help="prompt pairs per set")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--ray", action="store_true", help="also time --engine ray with 1 and 2 workers"
    )
    parser.add_argument(
        "--ray-only", action="store_true", help="time only the Ray engine (1 and 2 workers)"
    )
    parser.add_argument("--out-json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = run(
        args.jobs,
        args.prompt_sets,
        args.shots,
        args.size,
        args.ray or args.ray_only,
        local=not args.ray_only,
    )
    text = json.dumps(
        {
            "jobs": args.jobs,
            "prompt_sets": args.prompt_sets,
            "shots": args.shots,
            "size": args.size,
            **figures,
        }
    )
    print(text)
    if args.out_json is not None:
        args.out_json.write_text(text + "\n")


if __name__ == "__main__":
    cli()
