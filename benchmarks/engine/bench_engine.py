"""Engine benchmark: latency, throughput and whole-volume time per backend.

Run from the repository root:

    python -m benchmarks.engine.bench_engine --quick        # CPU-friendly grid (a few minutes on 2
    cores)
    python -m benchmarks.engine.bench_engine                # full grid: K 1/4/8/16, 128 and 256 px,
    batch 1-256

What is timed (prompt state encoded once unless said otherwise; inputs are random, never zeros):
- latency: one query decoded against a cached prompt set (batch 1), median over repeats;
- throughput: queries per second decoding batches of B against a cached prompt set;
- volume: a whole S-slice volume at K prompts, cached (prompts encoded once) and re-encoded (prompts
  encoded again for every batch of max-batch slices, as an engine without a prompt cache does).
Model: the packaged weights' architecture; at other resolutions the same architecture with random
weights (timings do not depend on weight values). CUDA timings synchronise before reading the clock.
Results go to benchmarks/results/engine-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from promptseg.engine.backends import (
    ENGINE_BACKENDS,
    InferenceBackend,
    backend_availability,
    create_backend,
)
from promptseg.engine.benchmark import random_prompts, run_seconds, time_volume
from promptseg.engine.segmenter import Segmenter
from promptseg.model import PromptSegNet
from promptseg.model.weights import load_model, packaged_weights_path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median_seconds(
    run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2
) -> float:
    """Median wall time of `run` over `repeats` calls after `warmup` untimed calls (synchronised on
    CUDA)."""
    return statistics.median(run_seconds(run, device, repeats, warmup))


def model_at(resolution: int) -> PromptSegNet:
    """The packaged architecture at `resolution` (packaged weights when the resolution matches)."""
    model = load_model(packaged_weights_path())
    if model.config.resolution == resolution:
        return model.eval()
    config = type(model.config).from_dict({**model.config.to_dict(), "resolution": resolution})
    torch.manual_seed(0)
    return PromptSegNet(config).eval()


def bench_backend(
    backend: InferenceBackend, args: argparse.Namespace, rng: np.random.Generator
) -> list[dict]:
    """Latency and throughput rows of one backend at one resolution, for every K."""
    config, device = backend.config, backend.device
    rows = []
    for shots in args.shots:
        prompts = random_prompts(config, shots, rng)
        state = backend.encode(*prompts)
        encode_s = median_seconds(lambda: backend.encode(*prompts), device, args.repeats, 1)
        rows.append({"kind": "encode", "shots": shots, "batch": 0, "seconds": encode_s})
        for batch in args.batches:
            queries = torch.from_numpy(
                rng.random(
                    (batch, config.in_channels, config.resolution, config.resolution),
                    dtype=np.float32,
                )
            )
            seconds = median_seconds(lambda: backend.decode(queries, state), device, args.repeats)
            rows.append(
                {
                    "kind": "latency" if batch == 1 else "throughput",
                    "shots": shots,
                    "batch": batch,
                    "seconds": seconds,
                    "queries_per_s": batch / seconds,
                }
            )
    return [{**row, "backend": backend.name, "resolution": config.resolution} for row in rows]


def bench_volume(
    name: str, model: PromptSegNet, device: torch.device, args: argparse.Namespace
) -> list[dict]:
    """Whole-volume rows (cached vs re-encoded) of one backend for every --volume-batch."""
    rows = []
    for batch in args.volume_batches:
        segmenter = Segmenter(model, device=device, backend=name, max_batch=batch)
        timing = time_volume(
            segmenter,
            args.slices,
            model.config.resolution,
            args.volume_shots,
            repeats=args.volume_repeats,
        )
        rows.append(
            {
                "kind": "volume",
                "backend": name,
                "resolution": model.config.resolution,
                "shots": args.volume_shots,
                "batch": batch,
                "slices": args.slices,
                "seconds": timing.cached_s,
                "reencoded_seconds": timing.reencoded_s,
                "cache_speedup": timing.speedup,
            }
        )
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    """Tables: latency/throughput per backend, resolution and K; then whole-volume times."""
    lines = [
        f"# Engine benchmark: {header['device']}",
        "",
        f"{header['date']}; torch {header['torch']}; command: `{header['command']}`",
        "",
        "Prompt encoding, latency (batch 1) and throughput (queries/s) against a cached "
        "prompt set:",
        "",
        "| backend | R | K | encode ms | batch | ms | queries/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    encode = {
        (r["backend"], r["resolution"], r["shots"]): r["seconds"]
        for r in rows
        if r["kind"] == "encode"
    }
    for r in rows:
        if r["kind"] in ("latency", "throughput"):
            lines.append(
                f"| {r['backend']} | {r['resolution']} | {r['shots']} | "
                f"{1e3 * encode[(r['backend'], r['resolution'], r['shots'])]:.1f} "
                f"| {r['batch']} | {1e3 * r['seconds']:.1f} | {r['queries_per_s']:.1f} |"
            )
    volume = [r for r in rows if r["kind"] == "volume"]
    if volume:
        lines += [
            "",
            "Whole volume (cached: prompts encoded once; re-encoded: once per batch):",
            "",
            "| backend | R | slices | K | batch | cached s | re-encoded s | cache speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['backend']} | {r['resolution']} | {r['slices']} | {r['shots']} | {r['batch']} | "
            f"{r['seconds']:.3f} "
            f"| {r['reencoded_seconds']:.3f} | {r['cache_speedup']:.2f}x |"
            for r in volume
        ]
    skipped = header.get("skipped", {})
    if skipped:
        lines += ["", "Backends not run:"] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CPU-friendly sizes")
    parser.add_argument(
        "--backends", nargs="+", default=list(ENGINE_BACKENDS), choices=ENGINE_BACKENDS
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shots", nargs="+", type=int)
    parser.add_argument("--resolutions", nargs="+", type=int)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--slices", type=int, default=256, help="slices of the whole-volume run")
    parser.add_argument("--volume-shots", type=int, default=8)
    parser.add_argument("--volume-batches", nargs="+", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--volume-repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/engine-<device>.json)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.shots = args.shots or ([1, 8] if quick else [1, 4, 8, 16])
    args.resolutions = args.resolutions or ([128] if quick else [128, 256])
    args.batches = args.batches or ([1, 16] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256])
    args.volume_batches = args.volume_batches or ([1, 16] if quick else [1, 16, 64])
    args.repeats = args.repeats or (3 if quick else 10)
    if quick:
        args.slices = min(args.slices, 64)
        args.volume_repeats = min(args.volume_repeats, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for name in args.backends:
        ok, why = backend_availability(name, device)
        if not ok:
            skipped[name] = why
            continue
        for resolution in args.resolutions:
            model = model_at(resolution)
            rows += bench_backend(create_backend(name, model, device), args, rng)
            if resolution == args.resolutions[-1]:
                rows += bench_volume(name, model, device, args)
            print(f"{name} R={resolution}: done", flush=True)
    command = "python -m benchmarks.engine.bench_engine " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    header = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": command.strip(),
        "skipped": skipped,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", header["device"].lower()).strip("-")
    out = args.out or RESULTS_DIR / f"engine-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, header)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
