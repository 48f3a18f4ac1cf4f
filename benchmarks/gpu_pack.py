"""Packed datasets small enough to travel to a GPU machine with the working tree.

Run from the repository root:

    python -m benchmarks.gpu_pack --data ../shared/data --out device_data/packed [--max-mib 60]

Builds the pack folders of every dataset under --data at the training recipe's resolution
(`promptseg.data.index.build_tasks` with a cache folder; --cache reuses a persistent one, --data may
also be a folder of pack folders), then writes a copy of each to --out, keeping --max-mib MiB in
all. Every dataset is kept: when the whole does not fit, each dataset keeps at most the same number
of bytes (the small ones whole), chosen deterministically (for each label value, rarest first, a
share of the examples that show it, evenly spaced; then evenly spaced examples of the rest);
packed.json records what was kept under "subsample". Pure-Python packages that the GPU image lacks
(nibabel, which promptseg.data.io imports) are copied from this interpreter's installation to --site
and count towards --max-mib; `benchmarks.gpu_session` puts them on the path there.

device_data/ is git-ignored: the datasets' licences forbid committing any of it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from promptseg.data.index import build_tasks
from promptseg.data.layouts import find_datasets, open_dataset
from promptseg.data.packed import (
    PackedExamples,
    find_packs,
    pack_folder,
    read_pack,
    write_pack,
)
from promptseg.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "release_cpu.yaml"
VENDORED = (
    "nibabel",
)  # imported by promptseg.data.io; absent from the GPU image (device KINDS.md)
MIB = 2**20
TRAVEL_LIMIT_MIB = 64  # what a device run carries: the working tree git sees plus the carried paths
ATTEMPTS = 4  # rewrites with a smaller target when file overheads push the total over --max-mib


def source_packs(data: Path, resolution: int, cache: Path) -> list[Path]:
    """The pack folders of `data` at `resolution`: `data` itself when it holds pack folders, else
    the pack folders that build_tasks writes (or finds up to date) under `cache`."""
    packs = find_packs(data)
    if packs:
        return [pack for pack in packs if read_pack(pack, resolution=resolution) is not None]
    config = TrainConfig.load(RECIPE)
    build_tasks([data], resolution, axis=config.axis, progress=True, cache_dir=cache)
    channels = config.model_config().in_channels
    return [
        pack_folder(cache, open_dataset(root), resolution, config.axis, channels)
        for root in find_datasets(data)
    ]


def example_bytes(examples: PackedExamples) -> int:
    """Bytes one example takes in a pack folder: its image, label map and case name."""
    return (
        examples.images[0].nbytes
        + examples.label_maps[0].nbytes
        + np.asarray(examples.case_ids).astype(str).itemsize
    )


def byte_cap(sizes: list[int], budget: int) -> float:
    """The largest cap C with sum(min(size, C)) <= budget (infinite when everything fits)."""
    if sum(sizes) <= budget:
        return float("inf")
    remaining, ordered = float(budget), sorted(sizes)
    for index, size in enumerate(ordered):
        cap = remaining / (len(ordered) - index)
        if size > cap:
            return cap
        remaining -= size
    return remaining  # pragma: no cover - the loop returns once the sizes exceed the budget


def evenly_spaced(items: np.ndarray, count: int) -> np.ndarray:
    """`count` (<= len(items)) evenly spaced entries of `items`, first and last included."""
    if count <= 0:
        return items[:0]
    return items[np.linspace(0, len(items) - 1, count).round().astype(int)]


def choose_examples(label_maps: np.ndarray, keep: int) -> np.ndarray:
    """Sorted indices of `keep` of the examples: for each non-zero label value (rarest first) up to
    keep // (2 · values) of the examples that show it, then evenly spaced ones of the rest."""
    count = len(label_maps)
    if keep >= count:
        return np.arange(count)
    flat = np.asarray(label_maps).reshape(count, -1)
    showing = {int(v): np.flatnonzero((flat == v).any(axis=1)) for v in np.unique(flat) if v != 0}
    quota = max(1, keep // (2 * max(len(showing), 1)))
    chosen = np.zeros(count, dtype=bool)
    for value in sorted(showing, key=lambda v: len(showing[v])):
        candidates = showing[value][~chosen[showing[value]]]
        chosen[evenly_spaced(candidates, min(quota, len(candidates), keep - int(chosen.sum())))] = (
            True
        )
    chosen[evenly_spaced(np.flatnonzero(~chosen), keep - int(chosen.sum()))] = True
    return np.flatnonzero(chosen)


def write_subsample(source: Path, target: Path, keep: int) -> tuple[int, int]:
    """Copy pack folder `source` to `target` with `keep` of its examples; (kept, examples)."""
    examples = read_pack(source)
    if examples is None:
        raise SystemExit(f"gpu_pack: {source}: unreadable pack folder")
    meta = json.loads((source / "packed.json").read_text())
    total = len(examples.images)
    index = choose_examples(examples.label_maps, keep)
    if len(index) < total:
        meta["subsample"] = {"kept": len(index), "examples": total}
    write_pack(
        target, meta, examples.images[index], examples.label_maps[index], examples.case_ids[index]
    )
    return len(index), total


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def tree_bytes() -> int | None:
    """Bytes of the files git sees in the working tree (tracked, or untracked and not ignored); None
    without git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (REPO / name for name in listed.decode().split("\0") if name)
    return sum(path.stat().st_size for path in paths if path.is_file())


def vendor(site: Path, names: tuple[str, ...]) -> None:
    """Copy the installed pure-Python packages `names` (without their tests) and their metadata to
    `site`."""
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise SystemExit(
                f"gpu_pack: {name} is not installed here, so it cannot be copied for the GPU "
                "machine"
            )
        shutil.copytree(
            Path(spec.origin).parent,
            site / name,
            ignore=shutil.ignore_patterns("tests", "__pycache__"),
        )
        distribution = importlib.metadata.distribution(name)
        info = {
            file.parts[0]
            for file in distribution.files or []
            if file.parts[0].endswith(".dist-info")
        }
        for folder in info:
            shutil.copytree(Path(str(distribution.locate_file(folder))), site / folder)


def pack(sources: list[Path], out: Path, budget: int) -> list[tuple[str, int, int]]:
    """Write the subsampled copies of `sources` to `out` within `budget` bytes; (folder, kept,
    examples) each."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in find_packs(out):
        if stale.name not in {source.name for source in sources}:
            shutil.rmtree(stale)
    examples = {source: read_pack(source) for source in sources}
    per_example = {
        source: example_bytes(e) if e is not None and len(e.images) else 1
        for source, e in examples.items()
    }
    sizes = {
        source: per_example[source] * (len(e.images) if e is not None else 0)
        for source, e in examples.items()
    }
    overhead = sum(len((source / "packed.json").read_bytes()) + 3 * 128 for source in sources)
    target = budget - overhead
    for _ in range(ATTEMPTS):
        cap = byte_cap(list(sizes.values()), max(target, 0))
        rows = [
            (
                source.name,
                *write_subsample(
                    source, out / source.name, int(min(sizes[source], cap) // per_example[source])
                ),
            )
            for source in sources
        ]
        excess = folder_bytes(out) - budget
        if excess <= 0:
            return rows
        target -= excess + 64 * 1024
    raise SystemExit(f"gpu_pack: could not fit the packs into {budget / MIB:.1f} MiB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="a folder of datasets, or of pack folders (default: ../shared/data)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "device_data" / "packed")
    parser.add_argument(
        "--site",
        type=Path,
        default=REPO / "device_data" / "site",
        help="where the vendored pure-Python packages go",
    )
    parser.add_argument(
        "--max-mib", type=float, default=60.0, help="limit on the packs plus the vendored packages"
    )
    parser.add_argument(
        "--resolution", type=int, help="default: the resolution of configs/release_cpu.yaml"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="persistent pack cache to build into or reuse (default: a temporary one)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolution = args.resolution or TrainConfig.load(RECIPE).model_config().resolution
    vendor(args.site, VENDORED)
    budget = int(args.max_mib * MIB) - folder_bytes(args.site)
    with tempfile.TemporaryDirectory(prefix="gpu-pack-") as temporary:
        sources = source_packs(args.data, resolution, args.cache or Path(temporary))
        if not sources:
            raise SystemExit(
                f"gpu_pack: no dataset or pack folder at resolution {resolution} under {args.data}"
            )
        rows = pack(sources, args.out, budget)
    for name, kept, total in rows:
        print(
            f"{name:<32} {kept:>6} of {total:>6} examples, "
            f"{folder_bytes(args.out / name) / MIB:6.2f} MiB"
        )
    total_mib = (folder_bytes(args.out) + folder_bytes(args.site)) / MIB
    print(
        f"{len(rows)} packs in {args.out}, vendored {', '.join(VENDORED)} in {args.site}: "
        f"{total_mib:.2f} MiB "
        f"(limit {args.max_mib:g})",
        file=sys.stderr,
    )
    tree = tree_bytes()
    if tree is not None:
        travels = total_mib + tree / MIB
        verdict = "fits" if travels <= TRAVEL_LIMIT_MIB else "does NOT fit: lower --max-mib"
        print(
            f"with the working tree ({tree / MIB:.2f} MiB) a device run carries {travels:.2f} MiB: "
            f"{verdict} "
            f"in {TRAVEL_LIMIT_MIB} MiB",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
