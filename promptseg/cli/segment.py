"""`promptseg segment`: segment 2D images and 3D NIfTI volumes from prompt images with masks or
sparse prompts.

Before any output is written, the prompts, every output path and every query are validated, each
query read once: by its header, and in full while the queries read so far fit in
KEPT_QUERY_BYTES (256 MiB); a query beyond is read, and its data checked, when it is segmented (an
error then leaves the earlier queries' outputs complete and none of its own). Each query then
gets `<name>_mask.png` (2D) or `<name>_mask.nii.gz` (NIfTI, same affine and header), optionally
`_prob.npy` / `_prob.nii.gz`, `_overlay.png`, `_uncertainty` and `_variance` maps (--uncertainty)
and `_candidate<i>` masks (--candidates), and for a DICOM query (a series folder, --series choosing
one of several, or a multi-frame file) `_seg.dcm` and, with --save-probabilities, `_prob_seg.dcm`
(DICOM-SEG, data.dicom.segmentation_writers); a query's files are written as one unit
(files.atomic_write_group: all of them or none, under a lock of the output folder), and temporary
files that a killed earlier run left in the output folder are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from promptseg.cli.batch import parse_label_names
from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import (
    add_backend_argument,
    add_model_arguments,
    add_threshold_argument,
    backend_options,
    check_threshold,
    load_segmenter,
)
from promptseg.data.dicom import (
    choose_series,
    highdicom_module,
    is_dicom_input,
    read_input,
    segmentation_kinds,
    segmentation_writers,
)
from promptseg.data.io import (
    NIFTI_EXTENSIONS,
    ImageData,
    canonical_view,
    nifti_writer,
    npy_writer,
    png_writer,
)
from promptseg.data.layouts import nearby_label_names
from promptseg.data.preprocess import all_finite, check_image
from promptseg.data.probe import decoded_bytes
from promptseg.data.volumes import has_volume_outputs
from promptseg.engine.batch import label_masks
from promptseg.engine.corrections import (
    parse_click,
    parse_scribble,
    read_scribble,
    refine_probabilities,
    voxel_spacing,
)
from promptseg.engine.ensemble import MAX_ENSEMBLE
from promptseg.engine.legend import with_legend
from promptseg.engine.overlay import LABEL_COLOURS, montage, montage_indices, overlay
from promptseg.engine.planes import ALL_AXES, PlanePrompts
from promptseg.engine.prompts_input import Prompt
from promptseg.engine.segmenter import EncodedPrompts, LabelResult, Segmenter, VolumeResult
from promptseg.engine.volume_prompts import (
    empty_masks_expected,
    volume_prompts,
    with_label_resolved,
)
from promptseg.errors import InputError, PromptSegError, is_out_of_memory
from promptseg.files import (
    Writer,
    atomic_write_group,
    file_extension,
    refuse_existing,
    strip_extension,
    sweep_stale_temporaries,
)

SPARSE_DEST = "sparse_prompts"
# Query arrays read and validated before anything is written and kept for segmentation, in all;
# queries beyond (by their headers' sizes) are checked by their headers first and read when
# segmented, so that each query is read once.
KEPT_QUERY_BYTES = 256 * 2**20


class _InOrder(argparse.Action):
    """Record (option, value) in command-line order, so that --click/--box/--scribble attach to the
    --prompt-image before them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        events = list(getattr(namespace, self.dest) or [])
        events.append((self.option_strings[0], values))
        setattr(namespace, self.dest, events)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help=COMMANDS["segment"].help,
        description="Segment each --query from prompts: prompt images with masks (--prompt IMAGE "
        "MASK), or a "
        "prompt image with clicks, boxes or a scribble (--prompt-image IMAGE --click X Y ...). 2D "
        "queries "
        "(PNG, JPEG, TIFF, BMP, NPY) give DIR/<name>_mask.png (0/255); NIfTI queries give "
        "DIR/<name>_mask.nii.gz "
        "in the query's own geometry, segmented slice by slice along --axis, and so do DICOM "
        "series and "
        "(X, Y, Z) .npy/.npz volumes (3D arrays whose first and last axes are not 1, 3 or 4 long; "
        "no geometry).",
    )
    prompts = parser.add_argument_group(
        "prompts (at least one; up to the model's limit, 64 by default)"
    )
    prompts.add_argument(
        "--prompt",
        action="append",
        nargs=2,
        default=[],
        metavar=("IMAGE", "MASK"),
        help="a prompt image and its mask or label map (repeatable)",
    )
    prompts.add_argument(
        "--label",
        type=int,
        nargs="+",
        metavar="N",
        help="segment label N of the prompt label maps (default: any non-zero value); several "
        "labels give one label map per query (<name>_mask holds the label values) and, with "
        "--save-probabilities, one probability file per label",
    )
    prompts.add_argument(
        "--prompt-volume",
        action="append",
        nargs=2,
        default=[],
        metavar=("IMAGE", "LABELS"),
        help="an annotated volume (NIfTI or DICOM series folder) and its label "
        "volume: --prompt-slices of its slices along --axis become prompts "
        "(repeatable; volumes mix)",
    )
    prompts.add_argument(
        "--prompt-slices",
        type=int,
        default=8,
        metavar="N",
        help="slices taken from each --prompt-volume: over the labelled extent, "
        "one in four just outside it (default 8)",
    )
    prompts.add_argument(
        "--prompt-image",
        action=_InOrder,
        dest=SPARSE_DEST,
        metavar="IMAGE",
        help="a prompt image annotated by the --click, --box and --scribble options after it "
        "(repeatable)",
    )
    prompts.add_argument(
        "--click",
        action=_InOrder,
        dest=SPARSE_DEST,
        nargs=2,
        type=float,
        metavar=("X", "Y"),
        help="a click on the target in pixels (repeatable; the clicks of one image form one "
        "prompt)",
    )
    prompts.add_argument(
        "--box",
        action=_InOrder,
        dest=SPARSE_DEST,
        nargs=4,
        type=float,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="a box around the target in pixels, corners inclusive (repeatable; one prompt each)",
    )
    prompts.add_argument(
        "--scribble",
        action=_InOrder,
        dest=SPARSE_DEST,
        metavar="MASK",
        help="a mask of strokes drawn on the target (repeatable; one prompt each)",
    )
    parser.add_argument(
        "--query",
        nargs="+",
        required=True,
        metavar="PATH",
        help="images, NIfTI volumes or DICOM series (a folder or a multi-frame "
        "file) to segment; a DICOM query also gets <name>_seg.dcm, a DICOM-SEG "
        "referencing its series",
    )
    parser.add_argument(
        "--series",
        action="append",
        default=[],
        metavar="UID",
        help="segment the series of this SeriesInstanceUID in the DICOM query "
        "folder holding it (repeatable; a folder of several series is refused "
        "without it)",
    )
    parser.add_argument(
        "--label-names",
        nargs="+",
        default=[],
        metavar="N=NAME",
        help="segment names in DICOM-SEG outputs (default: the labels of a "
        "dataset.json beside the prompt masks or the query, else 'label N')",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created when needed)"
    )
    parser.add_argument(
        "--axis",
        type=int,
        default=2,
        choices=(0, 1, 2),
        help="slicing axis of NIfTI volumes in their closest RAS orientation: 0 sagittal, 1 "
        "coronal, "
        "2 axial (default 2); results are written in each query's own voxel grid",
    )
    parser.add_argument(
        "--correct",
        action="append",
        nargs="+",
        default=[],
        metavar="X Y [Z] +|-",
        help="a correction click on the query (one --query): X Y on a 2D image "
        "(X the column), X Y Z voxel indices on a volume, then + (target here) "
        "or - (not target); repeatable, applied in order as local edits "
        "(promptseg.engine.corrections); with weights that read corrections (the shipped "
        "ones), the torch backend, --ensemble 1 and no --planes, the model also segments the "
        "query (a volume's clicked slices) again with all of them as input",
    )
    parser.add_argument(
        "--correct-scribble",
        action="append",
        nargs=2,
        default=[],
        metavar=("MASKFILE", "+|-"),
        help="a correction scribble on the query (one --query): a mask file of the query's own "
        "grid (2D image or volume; non-zero = stroke), then + (target there) or - (not "
        "target); repeatable, applied in order after the --correct clicks",
    )
    parser.add_argument(
        "--planes",
        action="store_true",
        help="with --prompt-volume: segment NIfTI/DICOM queries along all three "
        "axes, each from prompt-volume slices along that axis, and average (3x "
        "the time; fewer false positives on slices without the target)",
    )
    parser.add_argument(
        "--slice-consistency",
        action="store_true",
        help="make volume slices agree through the plane: logits smoothed over "
        "neighbouring slices, small 3D components apart from the target dropped",
    )
    add_threshold_argument(parser)
    parser.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <name>_prob.npy (2D) or <name>_prob.nii.gz (NIfTI), "
        "float32 in [0, 1], and for DICOM queries <name>_prob_seg.dcm, a "
        "FRACTIONAL DICOM-SEG",
    )
    parser.add_argument(
        "--overlay",
        action="store_true",
        help="also write <name>_overlay.png: the contour on the image, or a montage of up to 16 "
        "slices, "
        "with a legend below naming each colour (prediction, or label N)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_model_arguments(parser)
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help=f"average over N ensemble members: drop-one prompt subsets, then flips of prompts and "
        f"queries, calibrated on the prompts they leave out (1..{MAX_ENSEMBLE}, default 1: off; "
        "a single prompt gives at most 4 members)",
    )
    parser.add_argument(
        "--ensemble-shift",
        choices=("on", "off"),
        default="on",
        help="with --ensemble: move the mask threshold by the logit shift that scores best on the "
        "prompts the members leave out, and divide the members' logits by the temperature that "
        "fits "
        "those prompts best (on, default), or neither (off); the probabilities are never shifted",
    )
    parser.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write <name>_uncertainty (predictive entropy in bits) and, with --ensemble, "
        "<name>_variance (variance of the members' probabilities): float32 .nii.gz for NIfTI "
        "queries, 8-bit .png for 2D (255 = 1 bit of entropy, or a variance of 0.25)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=0,
        metavar="N",
        help="also write N plausible masks <name>_candidate1..N, those of the first N ensemble "
        "members (needs --ensemble M with N <= M)",
    )
    parser.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="STEPS",
        help="adapt a copy of the model to the prompts first: STEPS leave-one-out steps on its "
        "normalisation scales and output head (PyTorch backends; default 0: off)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="slices per forward pass (default 16)",
    )
    add_backend_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, **{SPARSE_DEST: None})


def collect_prompts(
    mask_pairs: Sequence[Sequence[str]], sparse: Sequence[tuple[str, Any]] | None
) -> list[Prompt]:
    """Prompts from --prompt pairs and the in-order sparse options; InputError when there are none.

    The clicks of one --prompt-image form one prompt; each --box and each --scribble is a prompt.
    """
    prompts = [
        Prompt(image=image, kind="mask", mask=mask, name=image) for image, mask in mask_pairs
    ]
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
        raise InputError(
            "--prompt",
            "no prompts given: pass --prompt IMAGE MASK, or --prompt-image IMAGE with "
            "--click X Y, --box X0 Y0 X1 Y1 or --scribble MASK",
        )
    return prompts


@dataclass
class QueryJob:
    """One query and the files it will produce (kind -> path, kinds: mask, prob, overlay; seg and
    prob_seg for DICOM). series: the DICOM series chosen by --series; label_names: the names of
    the DICOM-SEG's segments."""

    path: str
    nifti: bool
    outputs: dict[str, str]
    series: str | None = None
    label_names: dict[int, str] = field(default_factory=dict)


def plan_outputs(
    queries: Sequence[str],
    out_dir: str,
    probabilities: bool,
    overlay_png: bool,
    overwrite: bool,
    labels: Sequence[int] = (),
    uncertainty: bool = False,
    variance: bool = False,
    candidates: int = 0,
) -> list[QueryJob]:
    """Output paths of every query; InputError on clashing names or (without overwrite) existing
    files.

    With several labels, probabilities, uncertainty and variance maps go to one file per label
    (kinds prob_label{N}, uncertainty_label{N}, variance_label{N}); candidates are kinds
    candidate1..candidate{candidates}, masks like the mask."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(out_dir, "--out must be a folder, found a file")
    jobs: list[QueryJob] = []
    owners: dict[str, str] = {}
    for path in queries:
        name = strip_extension(os.path.basename(path.rstrip(os.sep)))
        if name in owners:
            raise InputError(
                path, f"gives the same output name '{name}' as {owners[name]}; rename one of them"
            )
        owners[name] = path
        nifti = has_volume_outputs(path)  # NIfTI, DICOM and .npy/.npz volumes: NIfTI outputs
        extensions = {"mask": ".nii.gz" if nifti else ".png"}
        if probabilities:
            extensions.update(
                {kind: ".nii.gz" if nifti else ".npy" for kind in per_label_kinds("prob", labels)}
            )
        for wanted, kind in ((uncertainty, "uncertainty"), (uncertainty and variance, "variance")):
            if wanted:
                extensions.update(
                    {k: ".nii.gz" if nifti else ".png" for k in per_label_kinds(kind, labels)}
                )
        extensions.update({f"candidate{n}": extensions["mask"] for n in range(1, candidates + 1)})
        if overlay_png:
            extensions["overlay"] = ".png"
        if is_dicom_input(path) and file_extension(path) not in NIFTI_EXTENSIONS:
            extensions.update(segmentation_kinds(probabilities))
        outputs = {
            kind: os.path.join(out_dir, f"{name}_{kind}{ext}") for kind, ext in extensions.items()
        }
        refuse_existing(list(outputs.values()), overwrite)
        jobs.append(QueryJob(path, nifti, outputs))
    return jobs


def per_label_kinds(kind: str, labels: Sequence[int]) -> list[str]:
    """Output kinds of a per-label map: `kind` for one label, `kind`_label{N} for each of
    several."""
    return [f"{kind}_label{label}" for label in labels] if len(labels) > 1 else [kind]


def encode(
    segmenter: Segmenter, prompts: list[Prompt], labels: Sequence[int] | None
) -> dict[int, EncodedPrompts]:
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
                raise InputError(
                    "--label",
                    "several labels need --prompt IMAGE LABEL_MAP pairs only (no clicks, boxes or "
                    "scribbles)",
                )
            return segmenter.encode_labels(
                [p.image for p in prompts], [p.mask for p in prompts], labels
            )
        label = labels[0] if labels else None
        return {label or 1: segmenter.encode_prompts(prompts, label=label)}
    except InputError as error:
        if error.source is None:
            raise InputError("--prompt", error.problem) from None
        raise


def is_volume(data: ImageData) -> bool:
    """A query is segmented as a volume when it is one by promptseg.data.volumes (as in the API):
    3D NIfTI and DICOM, and 3D arrays without a channel axis; other 3D arrays are 2D images."""
    return data.is_volume


def validate_query(data: ImageData, segmenter: Segmenter) -> None:
    """Raise InputError naming the file if the query cannot be segmented (channels, non-finite
    values), without preparing it (the segmenter prepares each query once)."""
    if is_volume(data):
        if not all_finite(data.array):
            raise InputError(data.path, "volume contains non-finite intensities (NaN or Inf)")
    else:
        check_image(data.array, segmenter.channels, source=data.path)


def read_and_validate(
    jobs: Sequence[QueryJob], segmenter: Segmenter, keep_bytes: int
) -> dict[str, ImageData]:
    """Check every query before anything is written, reading each at most once: its header always
    (probe.decoded_bytes), and in full, validated, when it fits in `keep_bytes` with those kept
    before it (in job order). Returns the queries read (path -> data); segment_query reads and
    validates the others when it comes to them."""
    kept: dict[str, ImageData] = {}
    for job in jobs:
        with out_of_memory_names(job.path):
            if decoded_bytes(job.path, job.series) > keep_bytes:
                continue
            data = read_input(job.path, job.series)
            validate_query(data, segmenter)
        kept[job.path] = data
        keep_bytes -= min(data.array.nbytes, keep_bytes)
    return kept


def predict(
    data: ImageData,
    segmenter: Segmenter,
    prompts: dict[int, EncodedPrompts],
    axis: int,
    threshold: float,
    consistency: bool = False,
) -> LabelResult:
    """Per-label probabilities in the query's own grid: (L, H, W) for images, (L, X, Y, Z) for
    volumes."""
    if is_volume(data):
        return segmenter.segment_volume_labels(
            data, prompts, axis=axis, threshold=threshold, consistency=consistency
        )
    return segmenter.segment_labels([data.array], prompts, threshold=threshold)[0]


def render_outputs(
    job: QueryJob, data: ImageData, result: LabelResult, args: argparse.Namespace
) -> dict[str, Writer]:
    """kind -> a writer of that output (all arrays computed up front, so writing cannot fail on
    them).

    One label: the mask is 0/255 (PNG) or 0/1 (NIfTI); several labels: the label map itself.
    PromptSegError naming the query when the model gave non-finite probabilities (never written)."""
    if not all_finite(result.probabilities):
        raise PromptSegError(
            f"{job.path}: the model gave non-finite probabilities (NaN or Inf); "
            "the weights are damaged or unsuited to this input, nothing was written"
        )
    several = len(result.labels) > 1
    mask = label_mask(result, result.probabilities, args.threshold, job.nifti)
    writers: dict[str, Writer] = {
        "mask": nifti_writer(mask, data) if job.nifti else png_writer(mask)
    }
    uncertainty = (
        result.uncertainty if any(k.startswith("uncertainty") for k in job.outputs) else None
    )
    for index, label in enumerate(result.labels):
        suffix = f"_label{label}" if several else ""
        if f"prob{suffix}" in job.outputs:
            probabilities = result.probabilities[index]
            writers[f"prob{suffix}"] = (
                nifti_writer(probabilities, data) if job.nifti else npy_writer(probabilities)
            )
        for kind, values, full_scale in (
            ("uncertainty", uncertainty, 1.0),
            ("variance", result.variance, 0.25),
        ):
            if f"{kind}{suffix}" in job.outputs and values is not None:
                writers[f"{kind}{suffix}"] = map_writer(values[index], full_scale, data, job.nifti)
    for number in range(1, len(result.candidates) + 1 if result.candidates is not None else 1):
        if f"candidate{number}" in job.outputs:
            candidate = label_mask(result, result.candidates[number - 1], args.threshold, job.nifti)
            writers[f"candidate{number}"] = (
                nifti_writer(candidate, data) if job.nifti else png_writer(candidate)
            )
    if "overlay" in job.outputs:
        writers["overlay"] = png_writer(overlay_picture(data, result, args.axis))
    if "seg" in job.outputs:
        probabilities = result.probabilities if "prob_seg" in job.outputs else None
        source = data.dicom  # type: ignore[attr-defined]
        writers.update(
            segmentation_writers(
                source, label_masks(result), probabilities, result.labels, job.label_names
            )
        )
    return writers


def overlay_picture(data: ImageData, result: LabelResult, axis: int) -> np.ndarray:
    """The label contours on a 2D query, or on a montage of up to 16 slices of a volume, built from
    those slices alone (their label map and intensities: memory of the slices shown, not the
    volume)."""
    image, shown = data.array, result
    if is_volume(data):
        image = canonical_view(image, data.affine)  # slices as they were segmented
        indices = montage_indices(image.shape[axis])
        image = np.take(image, indices, axis=axis)
        shown_probabilities = [
            np.take(canonical_view(p, data.affine), indices, axis=axis)
            for p in result.probabilities
        ]
        shown = LabelResult(
            result.labels, np.stack(shown_probabilities), result.threshold, shifts=result.shifts
        )
    label_map = shown.label_map
    colours = [LABEL_COLOURS[n % len(LABEL_COLOURS)] for n in range(len(result.labels))]
    contours = [(label_map == label, colour) for label, colour in zip(result.labels, colours)]
    picture = montage(image, contours, axis) if is_volume(data) else overlay(image, contours)
    names = (
        [f"label {label}" for label in result.labels] if len(result.labels) > 1 else ["prediction"]
    )
    return with_legend(picture, list(zip(names, colours)))


def label_mask(
    result: LabelResult, probabilities: np.ndarray, threshold: float, nifti: bool
) -> np.ndarray:
    """The mask written for probabilities (L, *spatial) of result's labels: 0/255 (PNG) or 0/1
    (NIfTI) for one label, the label map for several."""
    if len(result.labels) > 1:
        return LabelResult(result.labels, probabilities, threshold, shifts=result.shifts).label_map
    mask = LabelResult(result.labels, probabilities, threshold, shifts=result.shifts).masks[0]
    return mask.astype(np.uint8) * (1 if nifti else 255)


def map_writer(values: np.ndarray, full_scale: float, data: ImageData, nifti: bool) -> Writer:
    """A writer of a float map: float32 NIfTI in the query's space, or an 8-bit PNG with 255 =
    full_scale."""
    if nifti:
        return nifti_writer(values.astype(np.float32), data)
    return png_writer(np.round(np.clip(values / full_scale, 0.0, 1.0) * 255.0).astype(np.uint8))


def write_all(job: QueryJob, writers: dict[str, Writer], overwrite: bool) -> None:
    """Write a query's outputs as one unit: all of them or, on any failure or interruption, none."""
    atomic_write_group([(job.outputs[kind], writer) for kind, writer in writers.items()], overwrite)


@contextlib.contextmanager
def out_of_memory_names(path: str) -> Iterator[None]:
    """Turn running out of memory within the block (MemoryError, or torch's allocator failing:
    errors.is_out_of_memory) into an InputError naming the query `path`."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise InputError(path, "not enough memory to segment it") from None


def segment_query(
    job: QueryJob,
    segmenter: Segmenter,
    encoded: dict[int, EncodedPrompts],
    args: argparse.Namespace,
    data: ImageData | None = None,
) -> None:
    """Segment and write one query (read and validated first unless `data` is given); running out of
    memory is an InputError naming the query."""
    with out_of_memory_names(job.path):
        if data is None:
            data = read_input(job.path, job.series)
            validate_query(data, segmenter)
        extra = (
            {"consistency": True} if args.slice_consistency else {}
        )  # predict's own call otherwise
        result = predict(data, segmenter, encoded, args.axis, args.threshold, **extra)
        if args.correct or args.correct_scribble:
            scribbles = read_scribbles(args.correct_scribble, data)
            result = corrected(
                result,
                data,
                parse_corrections(args.correct),
                scribbles,
                segmenter,
                next(iter(encoded.values())),
                args.axis,
            )
        writers = render_outputs(job, data, result, args)
    write_all(job, writers, args.overwrite)


def check_ensemble_options(ensemble: int, candidates: int) -> None:
    """InputError naming the flag for --ensemble outside 1..MAX_ENSEMBLE or --candidates without an
    ensemble, negative or above the members (checked before anything is loaded or written)."""
    if not 1 <= ensemble <= MAX_ENSEMBLE:
        raise InputError("--ensemble", f"must lie in 1..{MAX_ENSEMBLE}, got {ensemble}")
    if candidates < 0:
        raise InputError("--candidates", f"must be positive, got {candidates}")
    if candidates and ensemble < 2:
        raise InputError(
            "--candidates", "needs --ensemble N with N >= 2: the candidates are ensemble members"
        )
    if candidates > ensemble:
        raise InputError(
            "--candidates", f"must lie in 1..{ensemble} (the --ensemble members), got {candidates}"
        )


def prepare_dicom_jobs(
    jobs: Sequence[QueryJob], prompts: Sequence[Prompt], args: argparse.Namespace
) -> None:
    """Give each DICOM query its --series choice and its DICOM-SEG segment names (--label-names
    over a nearby dataset.json); InputError before anything is loaded for a bad --series or
    --label-names, or when a DICOM-SEG is due and highdicom is missing."""
    for job, series in zip(jobs, choose_series([job.path for job in jobs], args.series).values()):
        job.series = series
    names = dict(parse_label_names(args.label_names))
    masks = [p.mask for p in prompts if p.kind == "mask" and p.mask is not None]
    for job in jobs:
        if "seg" in job.outputs:
            highdicom_module(job.path)
            job.label_names = {**nearby_label_names([*masks, job.path]), **names}


def gather_prompts(args: argparse.Namespace, axis: int | None = None) -> list[Prompt]:
    """--prompt, sparse and --prompt-volume prompts in one list. With one --label and prompt
    volumes, every mask is reduced to that label first (slices without it belong to the set).
    axis: the axis along which the prompt volumes are sliced (default --axis)."""
    sparse = getattr(args, SPARSE_DEST)
    given = args.prompt or sparse or not args.prompt_volume
    prompts = collect_prompts(args.prompt, sparse) if given else []
    if not args.prompt_volume:
        return prompts
    if args.label is not None and len(args.label) == 1:
        prompts = with_label_resolved(prompts, args.label[0])
    images, labels = [v[0] for v in args.prompt_volume], [v[1] for v in args.prompt_volume]
    axis = args.axis if axis is None else axis
    return prompts + volume_prompts(images, labels, args.label, args.prompt_slices, axis)


def encode_all(
    segmenter: Segmenter, prompts: list[Prompt], args: argparse.Namespace
) -> dict[int, Any]:
    """encode() of the gathered prompts; with --planes, PlanePrompts per label (the prompt volumes
    sliced along each axis). With prompt volumes, empty masks (their slices without the label,
    chosen on purpose) do not warn."""
    single = args.prompt_volume and args.label is not None and len(args.label) == 1

    def encoded(chosen: list[Prompt]) -> dict[int, EncodedPrompts]:
        with empty_masks_expected() if args.prompt_volume else contextlib.nullcontext():
            if single:
                return {args.label[0]: encode(segmenter, chosen, None)[1]}
            return encode(segmenter, chosen, args.label)

    if not args.planes:
        return encoded(prompts)
    per_axis = {
        axis: encoded(prompts if axis == args.axis else gather_prompts(args, axis))
        for axis in ALL_AXES
    }
    return {
        label: PlanePrompts({axis: per_axis[axis][label] for axis in ALL_AXES})
        for label in per_axis[args.axis]
    }


def run(args: argparse.Namespace) -> int:
    check_planes(args)
    prompts = gather_prompts(args)
    check_threshold(args.threshold)
    check_ensemble_options(args.ensemble, args.candidates)
    check_corrections(args.correct, args.query, args.label, args.correct_scribble)
    jobs = plan_outputs(
        args.query,
        args.out,
        args.save_probabilities,
        args.overlay,
        args.overwrite,
        args.label or (),
        args.uncertainty,
        args.ensemble > 1,
        args.candidates,
    )
    prepare_dicom_jobs(jobs, prompts, args)
    segmenter = load_segmenter(
        args.checkpoint,
        args.device,
        args.max_batch,
        args.backend,
        backend_options(args.backend, args.export_dir),
        args.ensemble,
        args.adapt,
        args.candidates,
        args.ensemble_shift == "on",
        args.uncertainty,
    )
    encoded = encode_all(segmenter, prompts, args)
    members = min(
        len(e.ensemble.members) if getattr(e, "ensemble", None) is not None else 1
        for e in encoded.values()
    )
    if args.candidates > members:
        raise InputError(
            "--candidates",
            f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''} give only {members} "
            f"ensemble members, fewer than the {args.candidates} candidates asked for",
        )
    kept = read_and_validate(jobs, segmenter, KEPT_QUERY_BYTES)
    sweep_stale_temporaries(args.out)
    progress = tqdm(
        jobs,
        desc="segment",
        unit="query",
        file=sys.stderr,
        disable=True if args.no_progress else None,
    )
    for job in progress:
        segment_query(job, segmenter, encoded, args, kept.pop(job.path, None))
    print(
        f"segmented {len(jobs)} {'query' if len(jobs) == 1 else 'queries'} with {len(prompts)} "
        f"prompt{'s' if len(prompts) != 1 else ''}; wrote "
        f"{', '.join(sorted({k for j in jobs for k in j.outputs}))} "
        f"files to {args.out}"
    )
    return 0


def check_planes(args: argparse.Namespace) -> None:
    """InputError naming --planes unless it comes with --prompt-volume prompts only, volume queries
    and no ensemble (the planes' mean has no members' variance or candidates)."""
    if not args.planes:
        return
    if args.prompt or getattr(args, SPARSE_DEST) or not args.prompt_volume:
        raise InputError(
            "--planes", "needs --prompt-volume prompts only (2D prompt images have one plane)"
        )
    if args.ensemble > 1 or args.candidates:
        raise InputError("--planes", "does not combine with --ensemble or --candidates")
    for query in args.query:
        if not (file_extension(query) in NIFTI_EXTENSIONS or is_dicom_input(query)):
            raise InputError(query, "--planes segments volumes (NIfTI or DICOM), this query is 2D")


def parse_corrections(values: Sequence[Sequence[str]]) -> list[tuple]:
    """The --correct options -> clicks (x, y[, z], positive)."""
    return [parse_click(v) for v in values]


def check_corrections(
    values: Sequence[Sequence[str]],
    queries: Sequence[str],
    labels: Sequence[int] | None,
    scribbles: Sequence[Sequence[str]] = (),
) -> None:
    """InputError naming --correct (or --correct-scribble) unless its clicks (scribbles) parse and
    apply to one query and one label; a scribble file must exist (its shape is checked against the
    query's once the query is read)."""
    for flag, given in (("--correct", values), ("--correct-scribble", scribbles)):
        if not given:
            continue
        for value in given:
            parse_click(value) if flag == "--correct" else parse_scribble(value)
        if len(queries) != 1:
            raise InputError(flag, f"corrects one query, got {len(queries)} --query paths")
        if labels is not None and len(labels) > 1:
            raise InputError(flag, "corrects one label at a time, not several --label values")
    for path, _ in map(parse_scribble, scribbles):
        if os.path.isdir(path):
            raise InputError(path, "scribble is a folder, expected a mask file")
        if not os.path.isfile(path):
            raise InputError(path, "scribble file not found")


def read_scribbles(values: Sequence[Sequence[str]], data: ImageData) -> list[tuple]:
    """The --correct-scribble options -> (strokes, positive) on the query's grid: (H, W) for a 2D
    image, its stored (X, Y, Z) for a volume; InputError naming a file of another shape or grid."""
    shape = data.array.shape if is_volume(data) else data.array.shape[:2]
    nifti = file_extension(data.path) in NIFTI_EXTENSIONS
    affine = data.affine if is_volume(data) and nifti else None
    return [
        (read_scribble(path, shape, affine), positive)
        for path, positive in map(parse_scribble, values)
    ]


def corrected(
    result: LabelResult,
    data: ImageData,
    clicks: Sequence[tuple],
    scribbles: Sequence[tuple] = (),
    segmenter: Segmenter | None = None,
    prompts: EncodedPrompts | None = None,
    axis: int = 2,
) -> LabelResult:
    """A one-label result with the clicks, then the scribbles (strokes, positive), applied as
    local edits (corrections.refine_probabilities).

    With a `segmenter` whose model reads corrections (Segmenter.corrects_with_model) and the
    label's `prompts` from one axis without an ensemble, the model also segments the query again
    with them as input (a volume's corrected slices along `axis`), combined with the edits
    (Segmenter.refine with prompts). A click of the wrong dimension for the query or outside it
    is an InputError naming --correct."""
    probabilities = result.probabilities[0]
    with_model = (
        segmenter is not None
        and segmenter.corrects_with_model
        and isinstance(prompts, EncodedPrompts)
        and prompts.ensemble is None
    )
    if with_model and is_volume(data):
        refined = segmenter.refine(
            VolumeResult(probabilities, data, axis), clicks, scribbles, prompts=prompts
        ).probabilities
    elif with_model:
        refined = segmenter.refine(
            probabilities, clicks, scribbles, image=data.array, prompts=prompts
        )
    else:
        spacing = voxel_spacing(data.affine) if is_volume(data) else None
        refined = refine_probabilities(
            probabilities, data.array, clicks, scribbles, spacing=spacing
        )
    return LabelResult(
        result.labels, refined[None], result.threshold, result.variance, result.candidates
    )
