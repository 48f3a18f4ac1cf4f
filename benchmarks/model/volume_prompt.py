"""Volume-as-prompt benchmark (issue 18): segment a volume of a 3D dataset from K slices of another.

For each (prompt, query) pair of cases it prints the volume Dice of the query and the false-positive
voxels on the query's target-free slices (along --axis of the closest RAS orientation), then the
means. --empty sets how many of the K prompt slices lie outside the labelled extent (default
K // 4);
--consistency also runs segment_volume's through-plane consistency step and --planes the mean of the
three axes (prompt slices along each), and every combination is reported; --clicks N then applies N
simulated 3D corrective clicks (Segmenter.refine) and reports Dice after each; with --checkpoint
weights that read corrections, the model reads the clicks of the prompts of one axis (not --planes).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/model/volume_prompt.py \
        --data /work/shared/data/la_mri --pairs 4 --slices 4
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from promptseg.data.io import canonical_view, read_image, read_label, slice_volume
from promptseg.engine.corrections import voxel_spacing
from promptseg.engine.segmenter import Segmenter
from promptseg.eval.interactive import next_click
from promptseg.metrics import dice_percent
from promptseg.model.weights import packaged_weights_path


def free_slice_false_positives(prediction: np.ndarray, truth: np.ndarray, affine, axis: int) -> int:
    """Foreground voxels of `prediction` on its slices along `axis` (closest RAS) without truth."""
    predicted = slice_volume(canonical_view(prediction, affine), axis)
    target = slice_volume(canonical_view(truth, affine), axis)
    free = ~target.reshape(len(target), -1).any(axis=1)
    return int(predicted[free].sum())


def click_curve_3d(
    segmenter: Segmenter, result, truth: np.ndarray, clicks: int, prompts=None
) -> list[float]:
    """Dice (rounded to 0.1) after each of `clicks` simulated clicks in 3D on `result`: local edits
    one click at a time or, with the `prompts` of one axis (a model that reads corrections), every
    click so far read by the model on its slices, then the local edits (Segmenter.refine)."""
    curve, made = [], []
    spacing = voxel_spacing(result.source.affine)
    current = result
    for _ in range(clicks):
        click = next_click(current.mask, truth, spacing)
        if click is not None:
            made.append(click)
            if prompts is None:
                current = segmenter.refine(current, clicks=[click])
            else:
                current = segmenter.refine(result, clicks=made, prompts=prompts)
        curve.append(round(dice_percent(current.mask, truth), 1))
    return curve


def cases(folder: str) -> list[tuple[str, str]]:
    """(image, labels) paths of a dataset folder of images/ and labels/ with equal names."""
    names = sorted(os.listdir(os.path.join(folder, "images")))
    return [(os.path.join(folder, "images", n), os.path.join(folder, "labels", n)) for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/la_mri")
    parser.add_argument("--pairs", type=int, default=4, help="pairs (case i prompts case i + 1)")
    parser.add_argument("--start", type=int, default=0, help="first case i of the pairs")
    parser.add_argument("--slices", type=int, default=4, help="K prompt slices")
    parser.add_argument(
        "--empty", type=int, nargs="+", default=[None], help="slices outside the label"
    )
    parser.add_argument("--label", type=int, default=1)
    parser.add_argument("--axis", type=int, default=2)
    parser.add_argument(
        "--consistency", action="store_true", help="also score the consistency step"
    )
    parser.add_argument("--planes", action="store_true", help="also score the three-axis mean")
    parser.add_argument(
        "--clicks",
        type=int,
        default=0,
        help="then simulate this many 3D corrective clicks (eval --interactive's "
        "user, in 3D) and print Dice after each",
    )
    parser.add_argument("--checkpoint", default=None, help="weights (default: the shipped ones)")
    args = parser.parse_args()
    weights = args.checkpoint or packaged_weights_path()
    segmenter = Segmenter.from_checkpoint(weights, device="cpu", backend="torch")
    listed = cases(args.data)
    variants = [False, True] if args.consistency else [False]
    planes = [False, True] if args.planes else [False]
    rows: dict[tuple, list[tuple[float, int]]] = {}
    for pair in range(args.start, args.start + args.pairs):
        (prompt_image, prompt_labels), (query_image, query_labels) = listed[pair], listed[pair + 1]
        query = read_image(query_image)
        truth = read_label(query_labels).array == args.label
        for empty, plane in ((e, p) for e in args.empty for p in planes):
            axes = (0, 1, 2) if plane else args.axis
            prompts = segmenter.encode_volume_prompts(
                prompt_image,
                prompt_labels,
                label=args.label,
                slices=args.slices,
                axis=axes,
                empty=empty,
            )
            for consistent in variants:
                start = time.perf_counter()
                extra = {"consistency": True} if consistent else {}
                result = segmenter.segment_volume(query, prompts, axis=args.axis, **extra)
                mask = result.mask
                seconds = time.perf_counter() - start
                score = dice_percent(mask, truth)
                fp = free_slice_false_positives(mask, truth, query.affine, args.axis)
                reads = segmenter.corrects_with_model and not plane
                curve = click_curve_3d(
                    segmenter, result, truth, args.clicks, prompts if reads else None
                )
                rows.setdefault((empty, plane, consistent), []).append((score, fp, curve))
                print(
                    f"{os.path.basename(prompt_image)} -> {os.path.basename(query_image)} "
                    f"K={args.slices} "
                    f"empty={empty} planes={plane} consistency={consistent}: Dice {score:.1f}, "
                    f"FP voxels on target-free slices {fp}, {seconds:.1f} s"
                    + (f"; Dice after 1..{args.clicks} clicks {curve}" if curve else ""),
                    flush=True,
                )
    for (empty, plane, consistent), values in rows.items():
        scores, fps, curves = zip(*values)
        clicked = np.mean(curves, axis=0).round(1).tolist() if args.clicks else []
        print(
            f"mean over {len(values)} pairs, K={args.slices}, empty={empty}, planes={plane}, "
            f"consistency={consistent}: Dice {np.mean(scores):.1f} "
            f"(median {np.median(scores):.1f}), "
            f"FP voxels on target-free slices {np.mean(fps):.0f}"
            + (f"; Dice after 1..{args.clicks} clicks {clicked}" if clicked else "")
        )


if __name__ == "__main__":
    main()
