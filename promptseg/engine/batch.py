"""Batch segmentation jobs (`promptseg batch`, issue 19): a JSONL file of jobs, a job log that makes
a rerun resume, prompt sets encoded once, and queries of one prompt set decoded together.

A job is one JSON object a line:

    {"query": "scan.nii.gz", "prompts": [["p0.png", "p0_mask.png"], ...], "label": 2, "out":
    "case7",
     "truth": "scan_labels.nii.gz"}
    {"query": "ct_series/", "prompt_volume": ["atlas.nii.gz", "atlas_labels.nii.gz"], "label": [1,
    2]} {"query": "study/", "series": "1.2.840.1.7", "prompts": [["p0.png", "p0_mask.png"]]}

("series" picks one series of a DICOM folder holding several; "prompt_series" the same for a DICOM
prompt volume; "planes": true segments a volume query along its three axes from a prompt volume cut
along each, "slice_consistency": true makes a volume's slices agree (promptseg.engine.planes and
slice_context, as `segment --planes` and `--slice-consistency`). Options.planes and
Options.slice_consistency are the defaults of the jobs that can use them.)

Relative paths are taken from the jobs file's folder. The work is cut into units (run_unit): the 2D
queries of one prompt set in fixed groups of max_batch (fixed by the jobs file, not by what is left
to do, so a resumed run batches exactly as a clean one and gives the same bits), and each volume
alone. The driver (run_batch) appends to DIR/batch_log.jsonl a "start" record before a job runs and
a "done" or "failed" one after its files are in place; a rerun skips the done jobs of unchanged
specification, and a started job may replace its own files. Both engines (local, ray) run the same
units.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptseg.data.dicom import (
    is_dicom_input,
    read_input,
    segmentation_kinds,
    segmentation_writers,
)
from promptseg.data.io import ImageData, read_label, write_nifti_like, write_png
from promptseg.data.layouts import nearby_label_names
from promptseg.data.preprocess import all_finite, check_image
from promptseg.data.volumes import has_volume_outputs
from promptseg.engine.planes import ALL_AXES, PlanePrompts
from promptseg.engine.prompts_input import Prompt
from promptseg.engine.segmenter import EncodedPrompts, LabelResult, Segmenter
from promptseg.engine.volume_prompts import empty_masks_expected, read_volumes, volume_slices
from promptseg.errors import (
    InputError,
    PromptSegError,
    allocation_failures_as_memory_errors,
    short_reason,
)
from promptseg.files import atomic_write, strip_extension, write_text
from promptseg.metrics import dice_percent

LOG_NAME = "batch_log.jsonl"
SUMMARY_NAME = "summary.csv"
JOB_KEYS = (
    "query",
    "series",
    "prompts",
    "prompt_volume",
    "prompt_series",
    "label",
    "out",
    "truth",
    "planes",
    "slice_consistency",
)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt set as the jobs file names it: (image, mask or label map) pairs, or a prompt volume
    with its label volume from which `slices` slices holding the labels are taken along `axis`
    (series: the SeriesInstanceUID to read from a DICOM prompt volume folder of several series;
    planes: the prompt volume cut along each of the three axes, for three-plane segmentation)."""

    pairs: tuple[tuple[str, str], ...] = ()
    volume: tuple[str, str] | None = None
    labels: tuple[int, ...] | None = None
    axis: int = 2
    slices: int = 8
    series: str | None = None
    planes: bool = False


@dataclass(frozen=True)
class Job:
    """One line of the jobs file. outputs: kind -> path (mask, prob or prob_labelN, seg, prob_seg);
    series: the SeriesInstanceUID to read from a DICOM query folder of several series; consistency:
    make the volume's slices agree (slice_context)."""

    name: str
    line: int
    query: str
    prompts: PromptSpec
    truth: str | None
    digest: str  # of the job's specification and the options that change its outputs
    outputs: tuple[tuple[str, str], ...]
    series: str | None = None
    consistency: bool = False

    @property
    def volume(self) -> bool:
        """Whether the query is a 3D input (NIfTI or DICOM), segmented slice by slice."""
        return _kind_of(self.query) != "2d"


@dataclass(frozen=True)
class Options:
    """Options every job shares: threshold, slicing axis, probability files, label names,
    overwrite; planes and slice_consistency: the defaults of the jobs that can use them (volume
    queries; planes also needs a prompt volume) and that do not set them."""

    threshold: float = 0.5
    axis: int = 2
    probabilities: bool = False
    label_names: tuple[tuple[int, str], ...] = ()
    overwrite: bool = False
    prompt_slices: int = 8
    planes: bool = False
    slice_consistency: bool = False


@dataclass
class JobResult:
    """What one job came to: status "done" or "failed", seconds, Dice against its truth, reason."""

    name: str
    status: str
    seconds: float = 0.0
    dice: float | None = None
    reason: str = ""


@dataclass
class Unit:
    """Jobs run together: the 2D queries of one prompt set (at most max_batch), or one volume.
    pending: the names of the unit's jobs still to do (the others are computed but not written);
    replace: those allowed to replace their existing files (--overwrite, or started by an earlier
    run)."""

    jobs: list[Job]
    pending: set[str] = field(default_factory=set)
    replace: set[str] = field(default_factory=set)  # pending jobs that may replace existing outputs

    @property
    def prompts(self) -> PromptSpec:
        return self.jobs[0].prompts


def _kind_of(path: str) -> str:
    """'dicom', 'nifti' (NIfTI files and .npy/.npz volumes: NIfTI outputs) or '2d' for a query path,
    decided without reading it (promptseg.data.volumes.has_volume_outputs)."""
    if not has_volume_outputs(path):
        return "2d"
    return "dicom" if is_dicom_input(path) else "nifti"


def _labels(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise InputError(
            where, f"'label' must be a positive integer or a list of them, got {json.dumps(value)}"
        )
    if len(set(values)) != len(values):
        raise InputError(where, f"'label' repeats a value: {json.dumps(value)}")
    return tuple(values)


def _path(value: Any, base: str, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(where, f"'{key}' must be a path, got {json.dumps(value)}")
    return os.path.normpath(os.path.join(base, value))


def _prompt_spec(
    entry: Mapping[str, Any],
    base: str,
    where: str,
    labels: tuple[int, ...] | None,
    options: Options,
) -> PromptSpec:
    if ("prompts" in entry) == ("prompt_volume" in entry):
        raise InputError(
            where,
            "needs exactly one of 'prompts' ([[image, mask], ...]) and 'prompt_volume' ([image, "
            "labels])",
        )
    if "prompts" in entry:
        if "prompt_series" in entry:
            raise InputError(where, "'prompt_series' applies to a 'prompt_volume' only")
        pairs = entry["prompts"]
        if (
            not isinstance(pairs, list)
            or not pairs
            or not all(isinstance(p, list) and len(p) == 2 for p in pairs)
        ):
            raise InputError(where, "'prompts' must be a non-empty list of [image, mask] pairs")
        return PromptSpec(
            pairs=tuple(
                (_path(i, base, where, "prompts"), _path(m, base, where, "prompts"))
                for i, m in pairs
            ),
            labels=labels,
        )
    volume = entry["prompt_volume"]
    if not isinstance(volume, list) or len(volume) != 2:
        raise InputError(where, "'prompt_volume' must be [image, labels]")
    image = _path(volume[0], base, where, "prompt_volume")
    return PromptSpec(
        volume=(image, _path(volume[1], base, where, "prompt_volume")),
        labels=labels,
        axis=options.axis,
        slices=options.prompt_slices,
        series=_series(entry, "prompt_series", image, where),
    )


def _volume_flags(
    entry: Mapping[str, Any], query: str, where: str, options: Options
) -> tuple[bool, bool]:
    """The job's (planes, slice_consistency): its own JSON booleans, else the options' defaults
    where they apply. InputError naming `where` for a value that is not a boolean, 'planes' without
    a 'prompt_volume' or either on a 2D query."""
    volume = _kind_of(query) != "2d"
    chosen = []
    for key, default in (
        ("planes", options.planes),
        ("slice_consistency", options.slice_consistency),
    ):
        value = entry.get(key)
        if value is not None and not isinstance(value, bool):
            raise InputError(where, f"'{key}' must be true or false, got {json.dumps(value)}")
        if value and not volume:
            raise InputError(where, f"'{key}' applies to volume queries, {query} is 2D")
        if value and key == "planes" and "prompt_volume" not in entry:
            raise InputError(
                where, "'planes' needs a 'prompt_volume' (prompt images have one plane)"
            )
        usable = volume and (key != "planes" or "prompt_volume" in entry)
        chosen.append(bool(default and usable) if value is None else value)
    return chosen[0], chosen[1]


def _series(entry: Mapping[str, Any], key: str, path: str, where: str) -> str | None:
    """The SeriesInstanceUID under `key` of a job, for the DICOM input `path`; InputError naming
    `where` when it is not a UID or `path` is not a DICOM input."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not all(part.isdigit() for part in value.split(".")):
        raise InputError(
            where, f"'{key}' must be a SeriesInstanceUID (digits and dots), got {json.dumps(value)}"
        )
    if not is_dicom_input(path):
        raise InputError(where, f"'{key}' chooses a DICOM series, but {path} is not a DICOM input")
    return value


def output_paths(
    name: str, kind: str, labels: tuple[int, ...] | None, out_dir: str, probabilities: bool
) -> tuple[tuple[str, str], ...]:
    """(kind, path) of every file a job writes: the mask (PNG for 2D, NIfTI for volumes), per-label
    or single probabilities (.npy / NIfTI) with `probabilities`, and for DICOM queries a DICOM-SEG
    (`_seg.dcm`, and `_prob_seg.dcm` FRACTIONAL with `probabilities`)."""
    volume = kind != "2d"
    kinds = {"mask": ".nii.gz" if volume else ".png"}
    if probabilities:
        several = labels is not None and len(labels) > 1
        for label in labels if several else (None,):
            kinds[f"prob_label{label}" if several else "prob"] = ".nii.gz" if volume else ".npy"
    if kind == "dicom":
        kinds.update(segmentation_kinds(probabilities))
    return tuple((k, os.path.join(out_dir, f"{name}_{k}{ext}")) for k, ext in kinds.items())


def read_jobs(path: str, out_dir: str, options: Options) -> list[Job]:
    """Parse and check the jobs file; InputError naming `path:LINE` for the first bad line (before
    any work)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the jobs file ({short_reason(exc)})") from None
    base = os.path.dirname(os.path.abspath(path))
    out_dir = os.path.abspath(out_dir)  # the Ray engine's actors may run in other folders
    jobs: list[Job] = []
    owners: dict[str, int] = {}
    shared = json.dumps(
        [
            options.threshold,
            options.axis,
            options.probabilities,
            options.label_names,
            options.prompt_slices,
        ]
    )
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(where, f"not a JSON object ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise InputError(where, "not a JSON object")
        unknown = sorted(set(entry) - set(JOB_KEYS))
        if unknown:
            raise InputError(
                where,
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: "
                f"{', '.join(JOB_KEYS)})",
            )
        if "query" not in entry:
            raise InputError(where, "needs a 'query'")
        query = _path(entry["query"], base, where, "query")
        labels = _labels(entry.get("label"), where)
        planes, consistency = _volume_flags(entry, query, where, options)
        prompts = _prompt_spec(entry, base, where, labels, options)
        if planes:
            prompts = dataclasses.replace(prompts, planes=True)
        name = entry.get("out", strip_extension(os.path.basename(query.rstrip(os.sep))))
        if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
            raise InputError(where, f"'out' must be a plain file name, got {json.dumps(name)}")
        if name in owners:
            raise InputError(
                where,
                f"gives the same output name '{name}' as line {owners[name]}; set 'out' on one of "
                "them",
            )
        owners[name] = number
        truth = None if entry.get("truth") is None else _path(entry["truth"], base, where, "truth")
        chosen = (
            [{"planes": planes, "slice_consistency": consistency}] if planes or consistency else []
        )
        digest = hashlib.sha256(
            json.dumps([entry, shared, *chosen], sort_keys=True).encode()
        ).hexdigest()[:16]
        outputs = output_paths(name, _kind_of(query), labels, out_dir, options.probabilities)
        series = _series(entry, "series", query, where)
        jobs.append(Job(name, number, query, prompts, truth, digest, outputs, series, consistency))
    if not jobs:
        raise InputError(path, "holds no jobs")
    return jobs


def plan_units(jobs: Sequence[Job], max_batch: int) -> list[Unit]:
    """Cut the jobs into units: per prompt set (in order of first use), its 2D queries in groups of
    max_batch in file order, and each volume query alone."""
    by_prompts: dict[PromptSpec, list[Job]] = {}
    for job in jobs:
        by_prompts.setdefault(job.prompts, []).append(job)
    units = []
    for members in by_prompts.values():
        flat = [job for job in members if not job.volume]
        units += [Unit(flat[n : n + max_batch]) for n in range(0, len(flat), max_batch)]
        units += [Unit([job]) for job in members if job.volume]
    return units


class JobLog:
    """The append-only job log DIR/batch_log.jsonl: one JSON record a line, flushed to disk each
    time.

    A line torn by a kill is ignored when read back."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, LOG_NAME)
        self.started: dict[str, str] = {}  # job name -> digest of its last start
        self.finished: dict[str, tuple[str, JobResult]] = {}  # job name -> (digest, result)
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                for text in handle:
                    self._load(text)
        os.makedirs(out_dir, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def _load(self, text: str) -> None:
        try:
            record = json.loads(text)
            name, digest, event = record["job"], record["digest"], record["event"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return
        if event == "start":
            self.started[name] = digest
        elif event in ("done", "failed"):
            self.finished[name] = (
                digest,
                JobResult(
                    name,
                    event,
                    float(record.get("seconds", 0.0)),
                    record.get("dice"),
                    record.get("reason", ""),
                ),
            )

    def done(self, job: Job) -> JobResult | None:
        """The logged result of `job` if it finished successfully with the same specification."""
        entry = self.finished.get(job.name)
        return (
            entry[1]
            if entry is not None and entry[0] == job.digest and entry[1].status == "done"
            else None
        )

    def was_started(self, job: Job) -> bool:
        return self.started.get(job.name) == job.digest

    def append(self, job: Job, event: str, result: JobResult | None = None) -> None:
        record: dict[str, Any] = {"job": job.name, "digest": job.digest, "event": event}
        if result is not None:
            record.update(seconds=round(result.seconds, 4), dice=result.dice, reason=result.reason)
            self.finished[job.name] = (job.digest, result)
        else:
            self.started[job.name] = job.digest
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _read_prompt_volume(spec: PromptSpec) -> tuple[ImageData, ImageData]:
    """The prompt volume of spec.volume and its label volume, read once."""
    image_path, labels = spec.volume  # type: ignore[misc]
    image, label_data = read_volumes(read_input(image_path, spec.series), labels)
    return image, label_data  # type: ignore[return-value]


def _prompt_volume_pairs(
    spec: PromptSpec, volumes: tuple[ImageData, ImageData] | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """spec.slices (H, W) image and label slices of the prompt volume along spec.axis of its
    closest RAS orientation, chosen by promptseg.engine.volume_prompts (over the labelled extent,
    a few just outside it). volumes: the prompt and label volumes already read (else read now)."""
    image, labels = volumes if volumes is not None else _read_prompt_volume(spec)
    cut = volume_slices(image, labels, label=spec.labels, slices=spec.slices, axis=spec.axis)
    return list(cut.images), list(cut.labels)


def encode(
    segmenter: Segmenter,
    spec: PromptSpec,
    volumes: tuple[ImageData, ImageData] | None = None,
) -> dict[int, EncodedPrompts | PlanePrompts]:
    """Encode a prompt set: one EncodedPrompts per label (key 1 without labels: any non-zero value),
    with spec.planes one PlanePrompts per label (the prompt volume, read once, cut along each
    axis). volumes: spec.volume's prompt and label volumes already read. The Segmenter's prompt
    cache keys the encodings by content, so a prompt set is encoded once."""
    if spec.planes:
        volumes = _read_prompt_volume(spec)
        per_axis = {
            axis: encode(segmenter, dataclasses.replace(spec, axis=axis, planes=False), volumes)
            for axis in ALL_AXES
        }
        return {
            label: PlanePrompts({axis: per_axis[axis][label] for axis in ALL_AXES})
            for label in per_axis[ALL_AXES[0]]
        }
    if spec.volume is not None:
        images, maps = _prompt_volume_pairs(spec, volumes)
    else:
        images, maps = [i for i, _ in spec.pairs], [m for _, m in spec.pairs]
    label = spec.labels[0] if spec.labels else None
    key = label or 1
    expected = empty_masks_expected() if spec.volume is not None else contextlib.nullcontext()
    with expected:  # prompt-volume slices without the label are chosen on purpose
        if spec.labels is not None and len(spec.labels) > 1:
            return segmenter.encode_labels(images, maps, spec.labels)
        if spec.volume is not None:  # binary masks: some slices lack the label
            maps = [((m > 0) if label is None else (m == label)).astype(np.uint8) for m in maps]
            label = None
        prompts = [Prompt(image=i, kind="mask", mask=m) for i, m in zip(images, maps)]
        return {key: segmenter.encode_prompts(prompts, label=label)}


def _score(job: Job, result: LabelResult, masks: np.ndarray) -> float | None:
    """Mean Dice over the labels of `masks` (L, *spatial) against the job's truth label file."""
    if job.truth is None:
        return None
    truth = read_label(job.truth).array
    if truth.shape != masks.shape[1:]:
        raise InputError(
            job.truth, f"truth of shape {truth.shape} does not match the query's {masks.shape[1:]}"
        )
    if job.prompts.labels is None:
        return dice_percent(masks[0], truth > 0)
    return float(
        np.mean([dice_percent(m, truth == label) for m, label in zip(masks, result.labels)])
    )


def label_masks(result: LabelResult) -> np.ndarray:
    """(L, *spatial) bool masks of result's labels: the label map's regions for several labels,
    the (ensemble-shifted) threshold's mask for one (LabelResult.masks)."""
    if len(result.labels) > 1:
        label_map = result.label_map
        return np.stack([label_map == label for label in result.labels])
    return result.masks[:1]


def label_names(job: Job, options: Options) -> dict[int, str]:
    """Segment names of a job's DICOM-SEG: the labels of a dataset.json beside its prompt label maps
    or its query (layouts.nearby_label_names), overridden by --label-names."""
    spec = job.prompts
    maps = [m for _, m in spec.pairs] if spec.volume is None else [spec.volume[1]]
    return {**nearby_label_names([*maps, job.query]), **dict(options.label_names)}


def _writers(
    job: Job, data: ImageData, result: LabelResult, options: Options
) -> tuple[list[tuple[str, Callable[[str, bool], None]]], np.ndarray]:
    """(path, write(path, overwrite)) of every output of `job` (all arrays computed up front) and
    the (L, *spatial) bool masks. PromptSegError when the model gave non-finite probabilities."""
    if not all_finite(result.probabilities):
        raise PromptSegError(
            "the model gave non-finite probabilities (NaN or Inf); nothing was written"
        )
    outputs = dict(job.outputs)
    several = len(result.labels) > 1
    masks = label_masks(result)
    volume = job.volume
    writes: list[tuple[str, Callable[[str, bool], None]]] = []
    mask = result.label_map if several else masks[0].astype(np.uint8) * (1 if volume else 255)
    if volume:
        writes.append((outputs["mask"], lambda p, o: write_nifti_like(p, mask, data, o)))
    else:
        writes.append((outputs["mask"], lambda p, o: write_png(p, mask, o)))
    for index, label in enumerate(result.labels):
        kind = f"prob_label{label}" if several else "prob"
        if kind in outputs:
            values = result.probabilities[index]
            if volume:
                writes.append(
                    (outputs[kind], lambda p, o, v=values: write_nifti_like(p, v, data, o))
                )
            else:
                writes.append(
                    (
                        outputs[kind],
                        lambda p, o, v=values: atomic_write(p, lambda t: np.save(t, v), o),
                    )
                )
    if "seg" in outputs:
        probabilities = result.probabilities if "prob_seg" in outputs else None
        source = data.dicom  # type: ignore[attr-defined]
        writers = segmentation_writers(
            source,
            masks,
            probabilities,
            result.labels,
            label_names(job, options),
            uid_seed=job.digest,
        )
        for kind, writer in writers.items():
            writes.append((outputs[kind], lambda p, o, w=writer: atomic_write(p, w, o)))
    return writes, masks


def run_unit(segmenter: Segmenter, unit: Unit, options: Options) -> list[JobResult]:
    """Segment every job of `unit` and write the outputs of its pending ones; one JobResult per
    pending job. A job's failure (unreadable query, bad truth, unwritable output) is its result's
    one-line reason; a failure of the prompt set fails every pending job of the unit."""
    start = time.perf_counter()
    results: dict[str, JobResult] = {}
    try:
        with allocation_failures_as_memory_errors():
            encoded = encode(segmenter, unit.prompts)
    except (PromptSegError, MemoryError) as exc:
        reason = f"prompts: {_reason(exc)}"
        return [
            JobResult(job.name, "failed", 0.0, None, reason)
            for job in unit.jobs
            if job.name in unit.pending
        ]
    loaded: list[tuple[Job, ImageData]] = []
    for job in unit.jobs:
        try:
            data = read_input(job.query, job.series)
            # the rule of promptseg.data.volumes, as in the API
            if job.volume and not data.is_volume:
                raise InputError(job.query, f"expected a 3D volume, got shape {data.array.shape}")
            if not job.volume:  # a bad image fails its own job; it is prepared once, when segmented
                check_image(data.array, segmenter.channels, source=data.path)
            loaded.append((job, data))
        except (PromptSegError, MemoryError) as exc:
            results[job.name] = JobResult(job.name, "failed", 0.0, None, _reason(exc))
    if loaded:
        try:
            with allocation_failures_as_memory_errors():
                if unit.jobs[0].volume:
                    predictions = [
                        segmenter.segment_volume_labels(
                            loaded[0][1],
                            encoded,
                            options.axis,
                            options.threshold,
                            consistency=loaded[0][0].consistency,
                        )
                    ]
                else:
                    predictions = segmenter.segment_labels(
                        [d.array for _, d in loaded], encoded, options.threshold
                    )
        except (PromptSegError, MemoryError) as exc:
            predictions = None
            for job, _ in loaded:
                results[job.name] = JobResult(job.name, "failed", 0.0, None, _reason(exc))
        share = (time.perf_counter() - start) / len(unit.jobs)
        for (job, data), result in zip(loaded, predictions or []):
            if job.name not in unit.pending:
                continue
            began = time.perf_counter()
            try:
                writes, masks = _writers(job, data, result, options)
                score = _score(job, result, masks)
                for path, write in writes:
                    write(path, job.name in unit.replace)
                results[job.name] = JobResult(
                    job.name, "done", share + time.perf_counter() - began, score
                )
            except (PromptSegError, MemoryError) as exc:
                results[job.name] = JobResult(job.name, "failed", share, None, _reason(exc))
    return [results[job.name] for job in unit.jobs if job.name in unit.pending]


def _reason(exc: BaseException) -> str:
    """A one-line reason for a job's failure."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


Executor = Callable[
    [Sequence[Unit], Callable[[Unit], None]], Iterator[tuple[Unit, list[JobResult]]]
]


def local_executor(segmenter: Segmenter, options: Options) -> Executor:
    """Run the units one after the other in this process with `segmenter` (its prompt cache keeps
    each prompt set's encoding across units)."""

    def execute(
        units: Sequence[Unit], started: Callable[[Unit], None]
    ) -> Iterator[tuple[Unit, list[JobResult]]]:
        for unit in units:
            started(unit)
            yield unit, run_unit(segmenter, unit, options)

    return execute


def run_batch(
    jobs: Sequence[Job],
    out_dir: str,
    options: Options,
    max_batch: int,
    execute: Executor,
    progress: Callable[[int, int], Any] | None = None,
) -> list[JobResult]:
    """Run the jobs not yet done (per the job log in `out_dir`) with `execute`, log each job's start
    and end, and write `out_dir`/summary.csv; returns one JobResult per job in file order.

    progress(total, already_done) returns an object with update(n) and close() (a tqdm bar), or
    None."""
    os.makedirs(out_dir, exist_ok=True)
    log = JobLog(out_dir)
    results: dict[str, JobResult] = {}
    runnable: list[Unit] = []
    try:
        for unit in plan_units(jobs, max_batch):
            for job in unit.jobs:
                previous = log.done(job)
                if previous is not None:
                    results[job.name] = previous
                    continue
                replace = options.overwrite or log.was_started(job)
                existing = [path for _, path in job.outputs if os.path.exists(path)]
                if existing and not replace:
                    failure = JobResult(
                        job.name,
                        "failed",
                        reason=f"{existing[0]}: output exists; pass --overwrite to replace it",
                    )
                    log.append(job, "failed", failure)
                    results[job.name] = failure
                    continue
                unit.pending.add(job.name)
                if replace:
                    unit.replace.add(job.name)
            if unit.pending:
                runnable.append(unit)
        bar = progress(len(jobs), len(results)) if progress is not None else None
        by_name = {job.name: job for job in jobs}

        def started(unit: Unit) -> None:
            for name in sorted(unit.pending):
                log.append(by_name[name], "start")

        for unit, unit_results in execute(runnable, started):
            for result in unit_results:
                log.append(by_name[result.name], result.status, result)
                results[result.name] = result
            if bar is not None:
                bar.update(len(unit_results))
        if bar is not None:
            bar.close()
    finally:
        log.close()
    ordered = [results[job.name] for job in jobs]
    write_summary(os.path.join(out_dir, SUMMARY_NAME), jobs, ordered)
    return ordered


def write_summary(path: str, jobs: Sequence[Job], results: Sequence[JobResult]) -> None:
    """The summary CSV: job, status, seconds, dice (empty without truth), reason and query, one row
    a job."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", "status", "seconds", "dice", "reason", "query"])
    for job, result in zip(jobs, results):
        writer.writerow(
            [
                job.name,
                result.status,
                f"{result.seconds:.4f}",
                "" if result.dice is None else f"{result.dice:.2f}",
                result.reason,
                job.query,
            ]
        )
    write_text(path, buffer.getvalue(), overwrite=True)
