"""`promptseg segment`: segment 2D images and 3D NIfTI volumes from prompt images with masks or sparse prompts.

Everything is validated before any output is written: the prompts, every query and every output
path. Each query then gets `<name>_mask.png` (2D) or `<name>_mask.nii.gz` (NIfTI, same affine and
header), optionally `_prob.npy` / `_prob.nii.gz` and `_overlay.png`; a query's files are written
atomically and removed together if one of them cannot be written.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from promptseg.cli.common import add_backend_argument, backend_options, add_model_arguments, load_segmenter
from promptseg.data.dicom import is_dicom_input
from promptseg.data.io import (
    NIFTI_EXTENSIONS,
    ImageData,
    atomic_write,
    file_extension,
    read_image,
    strip_extension,
    write_nifti_like,
    write_png,
)
from promptseg.data.preprocess import all_finite, prepare_image
from promptseg.engine.overlay import LABEL_COLOURS, montage, overlay
from promptseg.engine.prompts_input import Prompt
from promptseg.engine.segmenter import EncodedPrompts, LabelResult, Segmenter
from promptseg.errors import InputError

SPARSE_DEST = "sparse_prompts"


class _InOrder(argparse.Action):
    """Record (option, value) in command-line order, so that --click/--box/--scribble attach to the
    --prompt-image before them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        events = list(getattr(namespace, self.dest) or [])
        events.append((self.option_strings[0], values))
        setattr(namespace, self.dest, events)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images or volumes from a few annotated prompts",
        description="Segment each --query from prompts: prompt images with masks (--prompt IMAGE MASK), or a "
        "prompt image with clicks, boxes or a scribble (--prompt-image IMAGE --click X Y ...). 2D queries "
        "(PNG, JPEG, TIFF, BMP, NPY) give DIR/<name>_mask.png (0/255); NIfTI queries give DIR/<name>_mask.nii.gz "
        "in the query's own geometry, segmented slice by slice along --axis.",
    )
    prompts = parser.add_argument_group("prompts (at least one; up to the model's limit, 64 by default)")
    prompts.add_argument("--prompt", action="append", nargs=2, default=[], metavar=("IMAGE", "MASK"),
                         help="a prompt image and its mask or label map (repeatable)")
    prompts.add_argument("--label", type=int, nargs="+", metavar="N",
                         help="segment label N of the prompt label maps (default: any non-zero value); several "
                         "labels give one label map per query (<name>_mask holds the label values) and, with "
                         "--save-probabilities, one probability file per label")
    prompts.add_argument("--prompt-image", action=_InOrder, dest=SPARSE_DEST, metavar="IMAGE",
                         help="a prompt image annotated by the --click, --box and --scribble options after it (repeatable)")
    prompts.add_argument("--click", action=_InOrder, dest=SPARSE_DEST, nargs=2, type=float, metavar=("X", "Y"),
                         help="a click on the target in pixels (repeatable; the clicks of one image form one prompt)")
    prompts.add_argument("--box", action=_InOrder, dest=SPARSE_DEST, nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                         help="a box around the target in pixels, corners inclusive (repeatable; one prompt each)")
    prompts.add_argument("--scribble", action=_InOrder, dest=SPARSE_DEST, metavar="MASK",
                         help="a mask of strokes drawn on the target (repeatable; one prompt each)")
    parser.add_argument("--query", nargs="+", required=True, metavar="PATH", help="images or NIfTI volumes to segment")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created when needed)")
    parser.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slicing axis of NIfTI volumes (default 2)")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="P", help="probability above which a pixel is foreground")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <name>_prob.npy (2D) or <name>_prob.nii.gz (NIfTI), float32 in [0, 1]")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>_overlay.png: the contour on the image, or a montage of up to 16 slices")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_model_arguments(parser)
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help="average over N flips of prompts and queries (1..4, default 1: off)")
    parser.add_argument("--adapt", type=int, default=0, metavar="STEPS",
                        help="adapt a copy of the model to the prompts first: STEPS leave-one-out steps on its "
                        "normalisation scales and output head (PyTorch backends; default 0: off)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="slices per forward pass (default 16)")
    add_backend_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, **{SPARSE_DEST: None})


def collect_prompts(mask_pairs: Sequence[Sequence[str]], sparse: Sequence[tuple[str, Any]] | None) -> list[Prompt]:
    """Prompts from --prompt pairs and the in-order sparse options; InputError when there are none.

    The clicks of one --prompt-image form one prompt; each --box and each --scribble is a prompt.
    """
    prompts = [Prompt(image=image, kind="mask", mask=mask, name=image) for image, mask in mask_pairs]
    groups: list[tuple[str, list[tuple[str, Any]]]] = []
    for option, value in sparse or []:
        if option == "--prompt-image":
            groups.append((value, []))
        elif not groups:
            raise InputError(option, "must follow a --prompt-image IMAGE that it annotates")
        else:
            groups[-1][1].append((option, value))
    for image, marks in groups:
        if not marks:
            raise InputError(image, "--prompt-image needs --click, --box or --scribble after it")
        clicks = [tuple(value) for option, value in marks if option == "--click"]
        if clicks:
            prompts.append(Prompt(image=image, kind="click", points=clicks, name=image))
        for option, value in marks:
            if option == "--box":
                prompts.append(Prompt(image=image, kind="box", box=tuple(value), name=image))
            elif option == "--scribble":
                prompts.append(Prompt(image=image, kind="scribble", mask=value, name=image))
    if not prompts:
        raise InputError("--prompt", "no prompts given: pass --prompt IMAGE MASK, or --prompt-image IMAGE with "
                         "--click X Y, --box X0 Y0 X1 Y1 or --scribble MASK")
    return prompts


@dataclass
class QueryJob:
    """One query and the files it will produce (kind -> path, kinds: mask, prob, overlay)."""

    path: str
    nifti: bool
    outputs: dict[str, str]


def plan_outputs(
    queries: Sequence[str], out_dir: str, probabilities: bool, overlay_png: bool, overwrite: bool,
    labels: Sequence[int] = (),
) -> list[QueryJob]:
    """Output paths of every query; InputError on clashing names or (without overwrite) existing files.

    With several labels, probabilities go to one file per label (kind prob_label{N})."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(out_dir, "--out must be a folder, found a file")
    jobs: list[QueryJob] = []
    owners: dict[str, str] = {}
    for path in queries:
        name = strip_extension(os.path.basename(path.rstrip(os.sep)))
        if name in owners:
            raise InputError(path, f"gives the same output name '{name}' as {owners[name]}; rename one of them")
        owners[name] = path
        nifti = file_extension(path) in NIFTI_EXTENSIONS or is_dicom_input(path)  # DICOM: NIfTI outputs
        extensions = {"mask": ".nii.gz" if nifti else ".png"}
        if probabilities:
            kinds = [f"prob_label{label}" for label in labels] if len(labels) > 1 else ["prob"]
            extensions.update({kind: ".nii.gz" if nifti else ".npy" for kind in kinds})
        if overlay_png:
            extensions["overlay"] = ".png"
        outputs = {kind: os.path.join(out_dir, f"{name}_{kind}{ext}") for kind, ext in extensions.items()}
        for output in outputs.values():
            if os.path.exists(output) and not overwrite:
                raise InputError(output, "output exists; pass --overwrite to replace it")
        jobs.append(QueryJob(path, nifti, outputs))
    return jobs


def encode(segmenter: Segmenter, prompts: list[Prompt], labels: Sequence[int] | None) -> dict[int, EncodedPrompts]:
    """Encode the prompts, one set per label (key 1 when no --label is given: any non-zero value).

    Problems of the prompt set as a whole are reported against --prompt."""
    for label in labels or []:
        if label < 1:
            raise InputError("--label", f"must be a positive label value, got {label}")
    if labels is not None and len(set(labels)) != len(labels):
        raise InputError("--label", f"repeated label values: {' '.join(map(str, labels))}")
    try:
        if labels is not None and len(labels) > 1:
            if any(p.kind != "mask" for p in prompts):
                raise InputError("--label", "several labels need --prompt IMAGE LABEL_MAP pairs only (no clicks, boxes or scribbles)")
            return segmenter.encode_labels([p.image for p in prompts], [p.mask for p in prompts], labels)
        label = labels[0] if labels else None
        return {label or 1: segmenter.encode_prompts(prompts, label=label)}
    except InputError as error:
        if error.source is None:
            raise InputError("--prompt", error.problem) from None
        raise


def is_volume(data: ImageData) -> bool:
    """A query is segmented as a volume when it is a 3D NIfTI; other 3D arrays are multi-channel 2D images."""
    return data.affine is not None and data.array.ndim == 3


def validate_query(data: ImageData, segmenter: Segmenter) -> None:
    """Raise InputError naming the file if the query cannot be segmented (channels, non-finite values)."""
    if is_volume(data):
        if not all_finite(data.array):
            raise InputError(data.path, "volume contains non-finite intensities (NaN or Inf)")
    else:
        prepare_image(data.array, segmenter.resolution, segmenter.channels, source=data.path)


def predict(data: ImageData, segmenter: Segmenter, prompts: dict[int, EncodedPrompts], axis: int, threshold: float) -> LabelResult:
    """Per-label probabilities in the query's own grid: (L, H, W) for images, (L, X, Y, Z) for volumes."""
    if is_volume(data):
        return segmenter.segment_volume_labels(data, prompts, axis=axis, threshold=threshold)
    return segmenter.segment_labels([data.array], prompts, threshold=threshold)[0]


def render_outputs(job: QueryJob, data: ImageData, result: LabelResult, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """kind -> a function writing that output (all arrays computed up front, so writing cannot fail on them).

    One label: the mask is 0/255 (PNG) or 0/1 (NIfTI); several labels: the label map itself."""
    overwrite = args.overwrite
    several = len(result.labels) > 1
    label_map = result.label_map if several or "overlay" in job.outputs else None  # an argmax over every label
    mask = label_map if several else (result.probabilities[0] > args.threshold).astype(np.uint8) * (1 if job.nifti else 255)
    writers: dict[str, Callable[[], None]] = {}
    if job.nifti:
        writers["mask"] = lambda: write_nifti_like(job.outputs["mask"], mask, data, overwrite)
    else:
        writers["mask"] = lambda: write_png(job.outputs["mask"], mask, overwrite)
    for index, label in enumerate(result.labels):
        kind = f"prob_label{label}" if several else "prob"
        if kind in job.outputs:
            writers[kind] = probability_writer(job.outputs[kind], result.probabilities[index], data, job.nifti, overwrite)
    if "overlay" in job.outputs:
        contours = [(label_map == label, LABEL_COLOURS[n % len(LABEL_COLOURS)]) for n, label in enumerate(result.labels)]
        picture = montage(data.array, contours, args.axis) if is_volume(data) else overlay(data.array, contours)
        writers["overlay"] = lambda: write_png(job.outputs["overlay"], picture, overwrite)
    return writers


def probability_writer(path: str, probabilities: np.ndarray, data: ImageData, nifti: bool, overwrite: bool) -> Callable[[], None]:
    """A function writing one label's float32 probabilities as NIfTI (in the query's space) or .npy."""
    if nifti:
        return lambda: write_nifti_like(path, probabilities, data, overwrite)
    return lambda: atomic_write(path, lambda tmp: np.save(tmp, probabilities), overwrite)


def write_all(job: QueryJob, writers: dict[str, Callable[[], None]]) -> None:
    """Run the writers; if one fails, remove this query's files already written and re-raise."""
    written: list[str] = []
    try:
        for kind, write in writers.items():
            write()
            written.append(job.outputs[kind])
    except BaseException:
        for path in written:
            os.remove(path)
        raise


def run(args: argparse.Namespace) -> int:
    prompts = collect_prompts(args.prompt, getattr(args, SPARSE_DEST))
    if not 0.0 < args.threshold < 1.0:
        raise InputError("--threshold", f"must lie strictly between 0 and 1, got {args.threshold}")
    jobs = plan_outputs(args.query, args.out, args.save_probabilities, args.overlay, args.overwrite, args.label or ())
    segmenter = load_segmenter(args.checkpoint, args.device, args.max_batch, args.backend,
                               backend_options(args.backend, args.export_dir), args.ensemble, args.adapt)
    encoded = encode(segmenter, prompts, args.label)
    for job in jobs:
        validate_query(read_image(job.path), segmenter)
    progress = tqdm(jobs, desc="segment", unit="query", file=sys.stderr, disable=True if args.no_progress else None)
    for job in progress:
        data = read_image(job.path)
        result = predict(data, segmenter, encoded, args.axis, args.threshold)
        write_all(job, render_outputs(job, data, result, args))
    print(f"segmented {len(jobs)} {'query' if len(jobs) == 1 else 'queries'} with {len(prompts)} "
          f"prompt{'s' if len(prompts) != 1 else ''}; wrote {', '.join(sorted({k for j in jobs for k in j.outputs}))} "
          f"files to {args.out}")
    return 0
