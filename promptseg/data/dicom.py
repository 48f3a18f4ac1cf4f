"""DICOM input: a folder holding one series of single-frame images, or one multi-frame file (issue
19).

The volume keeps the engine's NIfTI convention (io.ImageData): the array is (X, Y, Z) with X the
column index of a DICOM frame (along ImageOrientationPatient's row direction), Y its row index and Z
the slices sorted by their position along the slice normal; the affine maps (i, j, k, 1) to RAS+
world millimetres like nibabel's, i.e. DICOM's LPS patient coordinates with x and y negated. Stored
values go through the modality transform (RescaleSlope/RescaleIntercept, or a Modality LUT) and are
returned as float32; MONOCHROME1 images are inverted into MONOCHROME2's sense (higher is brighter).
Before any pixel data is read, the Rows x Columns x frames the headers claim are held against
io.max_pixels() and against what the files can hold (io.check_claimed_size).

A folder of several series is read with `series` (choose_series maps the CLI's --series UIDs to
the inputs holding them). Every problem with a series (several series in the folder, missing
or duplicated slices, uneven spacing, mixed sizes or orientations, a compressed transfer syntax
without a decoder, no pixel data) is one InputError naming the folder or file. pydicom is needed
only here, and is imported when a DICOM input is read: without it the error names the extra to
install.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from promptseg.data.io import (
    _IMAGE_MAX_RATIO,
    ImageData,
    check_claimed_size,
    check_image_array,
    read_image,
)
from promptseg.errors import InputError, short_reason

DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_EXTRA = "pip install 'promptseg[dicom]'"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ by more are "mixed orientations"
SPACING_TOLERANCE = (
    0.01  # slice gaps may differ by this fraction of the typical gap (as highdicom's rtol)
)
SPACING_FLOOR_MM = 1e-3  # and at least by this much, for positions rounded in their decimal strings


def _pydicom(source: str) -> Any:
    """The pydicom module, or an InputError naming `source` and the extra that installs it."""
    try:
        import pydicom
    except ImportError:
        raise InputError(
            source, f"reading DICOM needs pydicom, which is not installed: {DICOM_EXTRA}"
        ) from None
    return pydicom


def has_dicom_magic(path: str) -> bool:
    """Whether the file `path` starts with the DICOM preamble and "DICM" (Part 10 files)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether `path` is read as DICOM: a folder, a .dcm/.dicom file, or a file with the DICOM magic
    bytes.

    Decided without pydicom, so that a DICOM input without the extra installed is recognised and
    refused."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    return path.lower().endswith(DICOM_EXTENSIONS) or (
        os.path.isfile(path) and has_dicom_magic(path)
    )


@dataclass
class DicomSource:
    """Where a DICOM volume came from, for writing results that reference it (DICOM-SEG).

    datasets: the source instances' headers (no pixel data); a series gives one per slice in the
    volume's Z order, a multi-frame file one. frame_order: for a multi-frame file, the Z index of
    each of its frames in file order (None for a series)."""

    path: str
    series_uid: str
    datasets: list[Any]
    frame_order: list[int] | None = None

    @property
    def multiframe(self) -> bool:
        return self.frame_order is not None


@dataclass
class DicomImage(ImageData):
    """An ImageData read from DICOM: array (X, Y, Z) float32, RAS+ affine, a NIfTI header carrying
    the same geometry (so NIfTI outputs are written in the source's space) and the DICOM source."""

    dicom: DicomSource | None = field(default=None)


@dataclass
class _Frame:
    """One 2D frame of a series or a multi-frame file, with its geometry in LPS millimetres.

    position: (3,) ImagePositionPatient; orientation: (6,) row then column direction cosines;
    spacing: (row spacing, column spacing) = PixelSpacing; shape: (rows, columns)."""

    file: str
    index: (
        int | None
    )  # frame number (0-based) within a multi-frame file; None for a single-frame file
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    rescale: (
        tuple[float, float] | None
    )  # (slope, intercept) of a multi-frame file's frame; None: the dataset's


def read_dicom(path: str | os.PathLike, series: str | None = None) -> DicomImage:
    """Read a DICOM series folder (one series, or `series` by SeriesInstanceUID) or a multi-frame
    file.

    Returns a DicomImage: array (X, Y, Z) float32 after the modality transform, affine RAS+ (4, 4).
    Raises InputError, one line naming the folder or file, for any problem with the series."""
    path = os.fspath(path)
    pydicom = _pydicom(path)
    if not os.path.exists(path):
        raise InputError(path, "file or folder not found")
    headers = _headers(path, pydicom)
    datasets = _one_series(path, headers, series)
    multiframe = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe and len(datasets) > 1:
        raise InputError(
            path,
            f"series {datasets[0].SeriesInstanceUID} mixes {len(multiframe)} multi-frame and "
            f"{len(datasets) - len(multiframe)} single-frame files; pass one multi-frame file",
        )
    _check_claimed_voxels(path, datasets)
    for ds in datasets:
        _check_decodable(ds, pydicom)
    frames = (
        _multiframe_frames(datasets[0]) if multiframe else [_single_frame(ds) for ds in datasets]
    )
    order, step = _slice_order(path, frames)
    sorted_frames = [frames[n] for n in order]
    array = _pixels(datasets, sorted_frames, multiframe=bool(multiframe), pydicom=pydicom)
    affine = LPS_TO_RAS @ _lps_affine(sorted_frames[0], step)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    if multiframe:
        frame_order = [0] * len(frames)
        for z, n in enumerate(order):
            frame_order[n] = z
        source = DicomSource(path, str(datasets[0].SeriesInstanceUID), datasets, frame_order)
    else:
        source = DicomSource(path, str(datasets[0].SeriesInstanceUID), [datasets[n] for n in order])
    array = check_image_array(array, path)
    return DicomImage(
        array=array, is_volume=True, affine=affine, header=header, path=path, dicom=source
    )


def _headers(path: str, pydicom: Any) -> list[Any]:
    """The headers (no pixel data) of the DICOM files at `path`: the file itself, or every file in
    the folder and its subfolders that parses as DICOM (other files and DICOMDIR indexes are
    skipped)."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if not name.startswith(".")
        )
    headers = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, force=file == path)
        except (pydicom.errors.InvalidDicomError, EOFError) as exc:
            if file == path:
                raise InputError(path, f"not a readable DICOM file ({short_reason(exc)})") from None
            continue
        except Exception as exc:  # noqa: BLE001 (a truncated or corrupt file is one line naming it)
            raise InputError(file, f"unreadable DICOM file ({short_reason(exc)})") from None
        if ds.get("SOPClassUID") == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR)
            continue
        headers.append(ds)
    if not headers:
        raise InputError(path, "no DICOM files in this folder")
    return headers


def _series_groups(path: str, headers: Sequence[Any]) -> dict[str, list[Any]]:
    """SeriesInstanceUID -> the image instances of that series among `headers` (in file order);
    InputError naming `path` when none of them holds an image."""
    images = [ds for ds in headers if "Rows" in ds and "Columns" in ds]
    if not images:
        kinds = sorted({str(ds.get("Modality", "?")) for ds in headers})
        raise InputError(
            path, f"no pixel data: the DICOM files hold no images (modality {', '.join(kinds)})"
        )
    groups: dict[str, list[Any]] = {}
    for ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    return groups


def _one_series(path: str, headers: Sequence[Any], series: str | None) -> list[Any]:
    """The image instances of the one series at `path` (or of `series`); InputError when there are
    none or several."""
    groups = _series_groups(path, headers)
    if series is not None:
        if series not in groups:
            raise InputError(path, f"no series {series} here; series present: {_describe(groups)}")
        return groups[series]
    if len(groups) > 1:
        raise InputError(
            path,
            f"holds {len(groups)} series, pass one series' folder or choose "
            f"one with --series UID: {_describe(groups)}",
        )
    return next(iter(groups.values()))


def series_uids(path: str | os.PathLike) -> list[str]:
    """The SeriesInstanceUIDs of the image series at `path` (a folder or one file), from the headers
    alone (no pixel data is read); InputError naming `path` as read_dicom would."""
    path = os.fspath(path)
    pydicom = _pydicom(path)
    if not os.path.exists(path):
        raise InputError(path, "file or folder not found")
    return list(_series_groups(path, _headers(path, pydicom)))


def choose_series(
    paths: Sequence[str], chosen: Sequence[str], flag: str = "--series"
) -> dict[str, str | None]:
    """The series to read from each of `paths` given the UIDs `chosen` on the command line.

    A DICOM input holding one of the chosen UIDs reads that series; other inputs get None (one
    series, read as is; several are refused by read_dicom naming them). InputError naming `flag`
    for a UID no input holds, or naming the input that holds two of them."""
    picks: dict[str, str | None] = {path: None for path in paths}
    if not chosen:
        return picks
    used: set[str] = set()
    for path in paths:
        if not is_dicom_input(path):
            continue
        held = set(series_uids(path))
        present = [uid for uid in dict.fromkeys(chosen) if uid in held]
        if len(present) > 1:
            raise InputError(
                path, f"holds several of the {flag} series ({', '.join(present)}); pass one"
            )
        if present:
            picks[path] = present[0]
            used.add(present[0])
    for uid in chosen:
        if uid not in used:
            raise InputError(flag, f"no DICOM input holds series {uid}")
    return picks


def read_input(path: str | os.PathLike, series: str | None = None) -> ImageData:
    """io.read_image, or with `series` the DICOM series of that SeriesInstanceUID at `path`."""
    if series is None:
        return read_image(path)
    if not is_dicom_input(path):
        raise InputError(
            os.fspath(path), f"series {series} was chosen, but this is not a DICOM input"
        )
    return read_dicom(path, series=series)


def _describe(groups: dict[str, list[Any]]) -> str:
    """'UID (CT 'description', N files); ...' for every series."""
    parts = []
    for uid, members in groups.items():
        first = members[0]
        description = str(first.get("SeriesDescription", "") or "")
        label = f"{first.get('Modality', '?')}" + (f" '{description}'" if description else "")
        parts.append(
            f"{uid or '(no SeriesInstanceUID)'} ({label}, {len(members)} "
            f"file{'s' if len(members) != 1 else ''})"
        )
    return "; ".join(parts)


def _compressed(ds: Any) -> bool:
    """Whether the transfer syntax of `ds` compresses its pixel data."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    return syntax is not None and syntax.is_compressed


def _check_claimed_voxels(path: str, datasets: Sequence[Any]) -> None:
    """io.check_claimed_size on the Rows x Columns x frames the headers of one series claim, before
    any pixel data is read or allocated: one InputError naming `path` above max_pixels(), or when
    the files are too small to hold that many stored values."""
    try:
        rows = max(int(ds.Rows) for ds in datasets)
        columns = max(int(ds.Columns) for ds in datasets)
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
        bits = int(datasets[0].get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError):
        raise InputError(path, "malformed Rows, Columns, NumberOfFrames or BitsAllocated") from None
    stored = sum(os.path.getsize(ds.filename) for ds in datasets)
    capacity = stored * (_IMAGE_MAX_RATIO if any(_compressed(ds) for ds in datasets) else 1)
    if bits < 8:
        capacity *= 8  # 1-bit data: eight values a byte
    check_claimed_size(path, (columns, rows, frames), max(1, bits // 8), capacity, what="voxels")


def _check_decodable(ds: Any, pydicom: Any) -> None:
    """InputError naming the file when its transfer syntax is compressed and no installed plugin
    decodes it."""
    if not _compressed(ds):
        return
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        available = pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InputError(
            ds.filename,
            f"compressed transfer syntax {syntax.name} ({syntax}) and no decoder for it is "
            "installed (see pydicom's pixel data handlers: pylibjpeg, gdcm)",
        )


def _required(ds: Any, keyword: str, file: str, count: int) -> list[float]:
    """The `count` numbers of attribute `keyword` of `ds`; InputError naming `file` when absent or
    malformed."""
    value = ds.get(keyword)
    try:
        numbers = [
            float(v)
            for v in (
                value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            )
        ]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        problem = "lacks" if value is None else "has a malformed"
        raise InputError(file, f"{problem} {keyword} (needed to place the slices in space)")
    return numbers


def _single_frame(ds: Any) -> _Frame:
    """The geometry of a single-frame image file."""
    file = str(ds.filename)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(
            file,
            f"colour DICOM images ({ds.get('PhotometricInterpretation', '?')}) are not supported",
        )
    return _Frame(
        file,
        None,
        np.array(_required(ds, "ImagePositionPatient", file, 3)),
        np.array(_required(ds, "ImageOrientationPatient", file, 6)),
        tuple(_required(ds, "PixelSpacing", file, 2)),
        (rows, columns),
        None,
    )  # type: ignore[arg-type]


def _group(ds: Any, frame: Any, keyword: str) -> Any | None:
    """The first item of functional group sequence `keyword` for one frame: its own, else the shared
    one."""
    for groups in (frame, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if groups is not None and keyword in groups and len(groups[keyword].value):
            return groups[keyword].value[0]
    return None


def _multiframe_frames(ds: Any) -> list[_Frame]:
    """The geometry of each frame of an enhanced multi-frame file, from its functional groups."""
    file = str(ds.filename)
    count = int(ds.NumberOfFrames)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(
            file,
            f"colour DICOM images ({ds.get('PhotometricInterpretation', '?')}) are not supported",
        )
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame) != count:
        raise InputError(
            file,
            f"multi-frame file with {count} frames but {len(per_frame)} per-frame functional "
            "groups "
            "(no plane positions to place them in space)",
        )
    frames = []
    for index, groups in enumerate(per_frame):
        where = f"{file} frame {index + 1}"
        position, orientation = (
            _group(ds, groups, "PlanePositionSequence"),
            _group(ds, groups, "PlaneOrientationSequence"),
        )
        measures = _group(ds, groups, "PixelMeasuresSequence")
        for name, item in (
            ("PlanePositionSequence", position),
            ("PlaneOrientationSequence", orientation),
            ("PixelMeasuresSequence", measures),
        ):
            if item is None:
                raise InputError(where, f"lacks {name} (needed to place the frames in space)")
        transform = _group(ds, groups, "PixelValueTransformationSequence")
        rescale = (
            None
            if transform is None
            else (
                float(transform.get("RescaleSlope", 1) or 1),
                float(transform.get("RescaleIntercept", 0) or 0),
            )
        )
        frames.append(
            _Frame(
                file,
                index,
                np.array(_required(position, "ImagePositionPatient", where, 3)),
                np.array(_required(orientation, "ImageOrientationPatient", where, 6)),
                tuple(_required(measures, "PixelSpacing", where, 2)),  # type: ignore[arg-type]
                (int(ds.Rows), int(ds.Columns)),
                rescale,
            )
        )
    return frames


def _name(frame: _Frame) -> str:
    name = os.path.basename(frame.file)
    return name if frame.index is None else f"frame {frame.index + 1}"


def _slice_order(path: str, frames: Sequence[_Frame]) -> tuple[list[int], np.ndarray]:
    """(indices of `frames` sorted along the slice normal, (3,) LPS step from one slice to the
    next).

    InputError naming `path` for mixed sizes, orientations or pixel spacings, duplicated or missing
    slices, uneven spacing, or slices that do not lie on one line."""
    for attribute, what in (("shape", "image sizes"), ("spacing", "pixel spacings")):
        values = Counter(tuple(getattr(f, attribute)) for f in frames)
        if len(values) > 1:
            shown = ", ".join(
                f"{'x'.join(f'{v:g}' for v in value)} ({n})" for value, n in values.most_common(3)
            )
            raise InputError(path, f"mixed {what} in one series: {shown}")
    orientation = frames[0].orientation
    for frame in frames[1:]:
        if np.abs(frame.orientation - orientation).max() > ORIENTATION_TOLERANCE:
            raise InputError(
                path,
                f"mixed orientations in one series: {_name(frames[0])} and {_name(frame)} differ "
                f"({' '.join(f'{v:g}' for v in frame.orientation)})",
            )
    normal = np.cross(orientation[:3], orientation[3:])
    if not 0.99 < np.linalg.norm(normal) < 1.01:
        raise InputError(path, "ImageOrientationPatient does not hold two orthogonal unit vectors")
    heights = np.array([float(f.position @ normal) for f in frames])
    order = [int(n) for n in np.argsort(heights, kind="stable")]
    if len(frames) == 1:
        return order, normal  # one slice: no spacing to measure, 1 mm along the normal
    sorted_heights = heights[order]
    gaps = np.diff(sorted_heights)
    typical = float(np.median(gaps))
    tolerance = max(SPACING_FLOOR_MM, SPACING_TOLERANCE * typical)
    duplicates = np.flatnonzero(
        gaps <= tolerance if typical > tolerance else gaps <= SPACING_FLOOR_MM
    )
    if duplicates.size:
        first, second = frames[order[duplicates[0]]], frames[order[duplicates[0] + 1]]
        raise InputError(
            path,
            f"duplicated slices: {_name(first)} and {_name(second)} lie at the same position "
            f"({sorted_heights[duplicates[0]]:g} mm along the slice normal)",
        )
    wide = np.flatnonzero(gaps > typical + tolerance)
    for n in wide:
        missing = gaps[n] / typical - 1
        if abs(missing - round(missing)) * typical <= tolerance:
            raise InputError(
                path,
                f"missing slice{'s' if round(missing) > 1 else ''}: a gap of {gaps[n]:g} mm "
                "between "
                f"{sorted_heights[n]:g} and {sorted_heights[n + 1]:g} mm along the slice normal "
                "where the "
                f"spacing is {typical:g} mm ({round(missing)} "
                f"slice{'s' if round(missing) > 1 else ''} "
                "absent)",
            )
    if np.abs(gaps - typical).max() > tolerance:
        raise InputError(
            path,
            f"uneven slice spacing: gaps from {gaps.min():g} to {gaps.max():g} mm along the slice "
            "normal",
        )
    positions = np.stack([frames[n].position for n in order])
    step = (positions[-1] - positions[0]) / (len(frames) - 1)
    expected = positions[0] + np.arange(len(frames))[:, None] * step
    if np.linalg.norm(positions - expected, axis=1).max() > tolerance:
        raise InputError(
            path, "the slice positions do not lie on one line (slices shifted within their planes)"
        )
    return order, step


def _lps_affine(first: _Frame, step: np.ndarray) -> np.ndarray:
    """(4, 4) from (column index i, row index j, slice k) to LPS mm: i runs along the row direction
    cosine at the column spacing, j along the column direction at the row spacing, k by `step`."""
    row_spacing, column_spacing = first.spacing
    affine = np.eye(4)
    affine[:3, 0] = first.orientation[:3] * column_spacing
    affine[:3, 1] = first.orientation[3:] * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    return affine


def _pixels(
    datasets: Sequence[Any], frames: Sequence[_Frame], multiframe: bool, pydicom: Any
) -> np.ndarray:
    """(X, Y, Z) float32 modality values of the sorted `frames` (pixel data read here, file by
    file)."""
    rows, columns = frames[0].shape
    out = np.empty((columns, rows, len(frames)), dtype=np.float32)
    if multiframe:
        ds = _full(datasets[0].filename, pydicom)
        stored = _decode(ds)
        if stored.shape != (len(frames), rows, columns):
            raise InputError(
                ds.filename,
                f"pixel data of shape {stored.shape}, expected {(len(frames), rows, columns)}",
            )
        for z, frame in enumerate(frames):
            transform = _modality_transform(ds, frame.rescale, pydicom)
            out[:, :, z] = _inverted_if_monochrome1(transform(stored[frame.index]), ds, transform).T
        return out
    for z, frame in enumerate(frames):
        ds = _full(frame.file, pydicom)
        stored = _decode(ds)
        if stored.shape != (rows, columns):
            raise InputError(
                frame.file, f"pixel data of shape {stored.shape}, expected {(rows, columns)}"
            )
        transform = _modality_transform(ds, None, pydicom)
        out[:, :, z] = _inverted_if_monochrome1(transform(stored), ds, transform).T
    return out


def _modality_transform(
    ds: Any, rescale: tuple[float, float] | None, pydicom: Any
) -> Callable[[np.ndarray], np.ndarray]:
    """Stored values -> float32 modality values: a frame's own (slope, intercept), else the
    dataset's Modality LUT or RescaleSlope/RescaleIntercept (pydicom's apply_modality_lut)."""
    if rescale is not None:
        slope, intercept = np.float32(rescale[0]), np.float32(rescale[1])
        return lambda stored: stored.astype(np.float32) * slope + intercept
    lut = pydicom.pixels.apply_modality_lut
    return lambda stored: np.asarray(lut(stored, ds), dtype=np.float32)


def _inverted_if_monochrome1(
    values: np.ndarray, ds: Any, transform: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """MONOCHROME1 (the lowest value shown white) turned into MONOCHROME2's sense, higher brighter:
    v -> lo + hi - v, with lo and hi the modality values of the smallest and largest stored value
    BitsStored allows (the same mapping for every slice, so the volume stays consistent)."""
    if str(ds.get("PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return values
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = transform(np.array([low, high], dtype=np.int64 if signed else np.uint64))
    return (np.float32(ends.min()) + np.float32(ends.max()) - values).astype(np.float32)


def _full(file: str, pydicom: Any) -> Any:
    """The whole dataset of `file`, pixel data included."""
    try:
        return pydicom.dcmread(file)
    except Exception as exc:  # noqa: BLE001 (corrupt after the header was read: one line naming it)
        raise InputError(file, f"unreadable DICOM file ({short_reason(exc)})") from None


def _decode(ds: Any) -> np.ndarray:
    """The stored pixel values of `ds`: (rows, columns) or (frames, rows, columns); InputError
    naming its file."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(ds.filename, "no pixel data")
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 (truncated or undecodable pixel data)
        raise InputError(ds.filename, f"unreadable pixel data ({short_reason(exc)})") from None


def highdicom_module(source: str) -> Any:
    """The highdicom module, or an InputError naming `source` and the extra that installs it."""
    try:
        import highdicom
    except ImportError:
        raise InputError(
            source, f"writing DICOM-SEG needs highdicom, which is not installed: {DICOM_EXTRA}"
        ) from None
    return highdicom


def label_name(label: int, names: Mapping[int, str] | None) -> str:
    """The segment label of `label`: its entry in `names`, else "label N"."""
    return (names or {}).get(label) or f"label {label}"


def segmentation(
    source: DicomSource,
    values: np.ndarray,
    labels: Sequence[int],
    names: Mapping[int, str] | None = None,
    fractional: bool = False,
    series_number: int = 900,
    uid_seed: str | None = None,
) -> Any:
    """A DICOM Segmentation (highdicom) of the source series: one segment per label, named by
    label_name.

    values: (L, X, Y, Z) in the source volume's grid (as read_dicom gives it): bool masks, or with
    `fractional` probabilities in [0, 1] (stored as a FRACTIONAL SEG, 8 bits). The frames reference
    the source instances (or frames of a multi-frame source) and copy their plane positions.
    uid_seed: derive the new series and instance UIDs from it and the source series (so a rerun
    gives the same UIDs); None: random UIDs."""
    hd = highdicom_module(source.path)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from promptseg import __version__

    values = np.asarray(values)
    if values.ndim != 4 or values.shape[0] != len(labels):
        raise ValueError(
            f"values must be (L, X, Y, Z) with L = {len(labels)} labels, got shape {values.shape}"
        )
    order = range(values.shape[3]) if source.frame_order is None else source.frame_order
    pixels = np.stack(
        [values[:, :, :, z].transpose(2, 1, 0) for z in order]
    )  # (frames, rows, columns, L)
    if not fractional:
        pixels = pixels.astype(bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="PromptSeg", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label_name(label, names),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, label in enumerate(labels, start=1)
    ]
    seeds = (
        [None, None]
        if uid_seed is None
        else [[source.series_uid, uid_seed, role] for role in ("series", "instance")]
    )
    series_uid, instance_uid = (
        hd.UID() if seed is None else generate_uid(entropy_srcs=seed) for seed in seeds
    )
    kind = (
        hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY
    )
    return hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="PromptSeg",
        manufacturer_model_name="PromptSeg",
        software_versions=__version__,
        device_serial_number="0",
        series_description="PromptSeg probabilities" if fractional else "PromptSeg segmentation",
    )


def segmentation_writer(segmentation_object: Any) -> Callable[[str], None]:
    """A writer (for files.atomic_write) saving a Segmentation as a DICOM Part 10 file."""
    return lambda temporary: segmentation_object.save_as(temporary, enforce_file_format=True)


def segmentation_kinds(probabilities: bool) -> dict[str, str]:
    """Output kind -> file ending of the DICOM-SEG outputs of a DICOM query: "seg" (BINARY) and,
    with `probabilities`, "prob_seg" (FRACTIONAL); written as NAME_seg.dcm and NAME_prob_seg.dcm."""
    return {"seg": ".dcm", "prob_seg": ".dcm"} if probabilities else {"seg": ".dcm"}


def segmentation_writers(
    source: DicomSource,
    masks: np.ndarray,
    probabilities: np.ndarray | None,
    labels: Sequence[int],
    names: Mapping[int, str] | None = None,
    uid_seed: str | None = None,
) -> dict[str, Callable[[str], None]]:
    """kind (segmentation_kinds) -> writer (for files.atomic_write) of the DICOM-SEG outputs of one
    DICOM volume: "seg" from masks (L, X, Y, Z) bool and, when probabilities (L, X, Y, Z) in [0, 1]
    are given, "prob_seg". The objects are built here, so writing cannot fail on their content.
    uid_seed: as segmentation's, suffixed by the kind (None: random UIDs)."""
    writers = {}
    for kind, values in (("seg", masks), ("prob_seg", probabilities)):
        if values is not None:
            seed = None if uid_seed is None else f"{uid_seed}:{kind}"
            seg = segmentation(source, values, labels, names, kind == "prob_seg", uid_seed=seed)
            writers[kind] = segmentation_writer(seg)
    return writers
