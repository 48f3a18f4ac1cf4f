"""`promptseg demo`: segment a synthetic 3D phantom from a few annotated slices, offline, in
seconds.

The target is the phantom's organ (label 1, with the lesion inside it, label 2). `--prompts`
evenly spaced slices that contain it are annotated with their true masks; the model segments every
slice along axis 0, and so does a nearest-prompt baseline (each slice copies the mask of its most
similar prompt slice). Dice is scored on the slices that were not prompts.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import add_model_arguments, load_segmenter
from promptseg.data.io import ImageData, write_nifti_like, write_png
from promptseg.data.synthetic import phantom_volume
from promptseg.engine.legend import with_legend
from promptseg.engine.overlay import GREEN, RED, montage
from promptseg.engine.volume_prompts import choose_slices
from promptseg.errors import InputError
from promptseg.eval.baselines import NearestPromptBaseline
from promptseg.metrics import dice_percent

DEFAULT_SHAPE = (48, 128, 128)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=COMMANDS["demo"].help,
        description="Builds a synthetic 3D phantom, takes --prompts annotated slices as prompts, "
        "segments the "
        "whole volume along axis 0, prints Dice on the other slices for the model and for a "
        "nearest-prompt "
        "baseline, and writes phantom.nii.gz, phantom_truth.nii.gz, phantom_prediction.nii.gz and "
        "phantom_overlay.png (truth green, prediction red) to --out, replacing earlier demo files.",
    )
    parser.add_argument(
        "--out",
        default="promptseg-demo",
        metavar="DIR",
        help="output folder (default: promptseg-demo)",
    )
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument(
        "--prompts",
        type=int,
        default=3,
        metavar="K",
        help="annotated slices used as prompts (default 3)",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def prompt_slices(truth: np.ndarray, count: int) -> np.ndarray:
    """`count` evenly spaced indices among the axis-0 slices of `truth` (D, H, W) that contain the
    target."""
    wanted = truth.reshape(truth.shape[0], -1).any(axis=1)
    if not 1 <= count <= int(wanted.sum()):
        raise InputError(
            "--prompts",
            f"must lie in 1..{int(wanted.sum())} (slices showing the target), got {count}",
        )
    return choose_slices(wanted, count, empty=0)


def nearest_prompt(volume: np.ndarray, truth: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Each slice of `volume` (D, H, W) takes the truth mask of its most similar prompt slice -> (D,
    H, W) bool."""
    slices = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    best = NearestPromptBaseline().similarity(slices, slices[chosen]).argmax(dim=1).numpy()
    return truth[chosen][best]


def run(args: argparse.Namespace) -> int:
    if any(size < 16 for size in args.shape):
        raise InputError("--shape", f"every size must be at least 16, got {tuple(args.shape)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(args.out, "--out must be a folder, found a file")
    segmenter = load_segmenter(args.checkpoint, args.device)
    volume, labels = phantom_volume(np.random.default_rng(args.seed), tuple(args.shape))
    truth = labels > 0
    chosen = prompt_slices(truth, args.prompts)
    encoded = segmenter.encode_prompts(volume[chosen], truth[chosen].astype(np.uint8))
    reference = ImageData(volume, True, None, None, "phantom")
    prediction = segmenter.segment_volume(reference, encoded, axis=0).mask
    baseline = nearest_prompt(volume, truth, chosen)
    held_out = np.setdiff1d(np.arange(volume.shape[0]), chosen)
    print(
        f"phantom {volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]} (seed {args.seed}); "
        f"prompts: slices {', '.join(str(i) for i in chosen)} of axis 0"
    )
    print(
        f"Dice on the {len(held_out)} other slices: promptseg "
        f"{dice_percent(prediction[held_out], truth[held_out]):.1f}, "
        f"nearest-prompt baseline {dice_percent(baseline[held_out], truth[held_out]):.1f}"
    )
    folder = args.out
    write_nifti_like(os.path.join(folder, "phantom.nii.gz"), volume, reference, overwrite=True)
    write_nifti_like(
        os.path.join(folder, "phantom_truth.nii.gz"), labels, reference, overwrite=True
    )
    write_nifti_like(
        os.path.join(folder, "phantom_prediction.nii.gz"),
        prediction.astype(np.uint8),
        reference,
        overwrite=True,
    )
    picture = with_legend(
        montage(volume, [(truth, GREEN), (prediction, RED)], axis=0),
        [("truth", GREEN), ("prediction", RED)],
    )
    write_png(os.path.join(folder, "phantom_overlay.png"), picture, overwrite=True)
    print(
        "wrote phantom.nii.gz, phantom_truth.nii.gz, phantom_prediction.nii.gz and "
        f"phantom_overlay.png to {args.out}"
    )
    return 0
