"""What resolution costs thin and small targets: the Dice ceiling of each grid the model works on.

Run from the repository root:

    python -m benchmarks.model.resolution_ceiling --data ../shared/data --cases 12

The model sees images at R = 128 px; its attention and label-propagation prior work on token grids
of stride 8 and 16 (16 x 16 and 8 x 8 tokens), and only its convolutional decoder works at strides
4, 2 and 1. For every task (dataset, label) this measures how well a perfect soft prediction on a
grid of G x G cells could reproduce the native-resolution mask: the mask is area-averaged to G x G
(the exact label fraction of every cell), upsampled bilinearly back to the native size, thresholded
at 0.5 and scored with Dice against the original. G = R / stride for the model's strides, plus
G = 256 (what a 256 px model would keep; ../shared/data stores its images at 256 px or less,
so there that column is the stored resolution and reads 100). Volumes are scored per slice along
`--axis`, pooled over the case. A low ceiling at G = 16 says the prior alone cannot draw the target;
a low ceiling at G = 128 says the model's input resolution already loses it.

Results go to benchmarks/results/resolution-ceiling.json and .md (per task, mean over the first
`--cases` labelled cases of each dataset).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.io import read_label, slice_volume
from promptseg.data.layouts import find_datasets, open_dataset

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
GRIDS = (8, 16, 32, 64, 128, 256)  # strides 16, 8, 4, 2, 1 at 128 px, then a 256 px model
GRID_NAMES = {
    8: "stride 16",
    16: "stride 8",
    32: "stride 4",
    64: "stride 2",
    128: "128 px",
    256: "256 px",
}


def grid_ceiling(masks: torch.Tensor, grid: int) -> tuple[float, float]:
    """Boolean masks (S, H, W) -> (intersection, total) of the Dice of their G x G reconstruction.

    Each mask is resized to (G, G) by area averaging (antialiased when shrinking), brought back to
    (H, W) bilinearly and thresholded at 0.5; Dice = 2 * intersection / total.
    """
    truth = masks.float()[:, None]
    coarse = F.interpolate(
        truth, size=(grid, grid), mode="bilinear", antialias=True, align_corners=False
    )
    back = F.interpolate(coarse, size=truth.shape[-2:], mode="bilinear", align_corners=False) > 0.5
    intersection = float((back & masks[:, None]).sum())
    return intersection, float(back.sum() + masks.sum())


def dataset_ceilings(root: Path, max_cases: int, axis: int) -> dict[str, dict[int, float]]:
    """Dice ceiling (percent) per task of one dataset folder and grid: {task: {G: dice}}."""
    dataset = open_dataset(root)
    sums: dict[int, dict[int, list[float]]] = {}
    cases = [case for case in dataset.cases if case.label_path is not None][:max_cases]
    for case in cases:
        label = read_label(case.label_path)  # type: ignore[arg-type]
        planes = slice_volume(label.array, axis) if label.is_volume else label.array[None]
        planes = torch.from_numpy(np.ascontiguousarray(planes).astype(np.int64))
        for value in torch.unique(planes).tolist():
            if value == 0:
                continue
            masks = planes == value
            masks = masks[masks.flatten(1).any(dim=1)]
            totals = sums.setdefault(value, {grid: [0.0, 0.0] for grid in GRIDS})
            for grid in GRIDS:
                intersection, total = grid_ceiling(masks, grid)
                totals[grid][0] += intersection
                totals[grid][1] += total
    return {
        f"{dataset.name}/{dataset.labels.get(value) or f'label_{value}'}": {
            grid: 200.0 * i / t if t else float("nan") for grid, (i, t) in grids.items()
        }
        for value, grids in sorted(sums.items())
    }


def markdown(table: dict[str, dict[int, float]], command: str) -> str:
    """The ceilings as a markdown table, one row per task, with the command that produced it."""
    header = "| task | " + " | ".join(f"{GRID_NAMES[g]} ({g}²)" for g in GRIDS) + " |"
    lines = [
        "# Dice ceiling of each grid (perfect soft prediction on the grid, scored at native size)",
        "",
        f"`{command}`",
        "",
        "Each mask is area-averaged to G x G, upsampled bilinearly to its stored size and "
        "thresholded at 0.5.",
        "At 128 px the model's attention and label-propagation prior work at strides 8 and 16; "
        "strides 4, 2",
        "and 1 are reached by the convolutional decoder only.",
        "",
        header,
        "|---|" + "---:|" * len(GRIDS),
    ]
    for task, grids in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{grids[g]:.1f}" for g in GRIDS) + " |")
    means = {g: float(np.nanmean([grids[g] for grids in table.values()])) for g in GRIDS}
    lines.append("| **mean** | " + " | ".join(f"**{means[g]:.1f}**" for g in GRIDS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", nargs="+", required=True, help="dataset folders, or folders of them"
    )
    parser.add_argument(
        "--cases", type=int, default=12, help="labelled cases read per dataset (default 12)"
    )
    parser.add_argument("--axis", type=int, default=2, help="slicing axis of volumes (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "resolution-ceiling",
        help="output path without suffix (default benchmarks/results/resolution-ceiling)",
    )
    args = parser.parse_args(argv)
    table: dict[str, dict[int, float]] = {}
    for given in args.data:
        for root in find_datasets(Path(given)):
            table.update(dataset_ceilings(root, args.cases, args.axis))
            print(f"{root.name}: done", flush=True)
    command = "python -m benchmarks.model.resolution_ceiling " + " ".join(
        ["--data", *args.data, "--cases", str(args.cases), "--axis", str(args.axis)]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "dice": table}, indent=1)
    )
    text = markdown(table, command)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
