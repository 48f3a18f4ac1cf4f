"""Small DICOM series and multi-frame files generated with pydicom for the DICOM tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
# An oblique orientation: rows along a unit vector in the x-y plane, columns tilted out of it.
OBLIQUE = (0.8, 0.6, 0.0, -0.48, 0.64, 0.6)


def _base(sop_class: str, study: str, series: str, frame_of_reference: str) -> Dataset:
    """The patient, study, series and image-pixel attributes every generated instance shares."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Test^Patient",
        "P1",
        "19700101",
        "O",
    )
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study, "1", "20240101", "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 1, "CT"
    ds.FrameOfReferenceUID = frame_of_reference
    ds.Manufacturer = "tests"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_series(
    folder: Path,
    stored: np.ndarray,
    orientation: Sequence[float] = OBLIQUE,
    spacing: tuple[float, float] = (0.9, 0.7),
    slice_gap: float = 2.5,
    origin: Sequence[float] = (-20.0, 13.0, 40.0),
    rescale: tuple[float, float] = (0.5, -1024.0),
    series_uid: str | None = None,
    seed: int = 0,
    skip: Sequence[int] = (),
    description: str = "",
) -> list[Path]:
    """Write `stored` (X, Y, Z) int16, X the column index, as one CT file per slice (Z) into
    `folder`.

    Slice k lies at origin + k * slice_gap along the normal of `orientation`; PixelSpacing is
    `spacing` (row spacing, column spacing). Files get shuffled names (seeded); slices in `skip`
    are not written. Returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    orientation = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    study, series, frame_of_reference = (
        "1.2.826.0.1.3680043.8.498.1",
        series_uid or generate_uid(),
        "1.2.826.0.1.3680043.8.498.2",
    )
    names = np.random.default_rng(seed).permutation(stored.shape[2])
    paths = []
    for k in range(stored.shape[2]):
        if k in skip:
            continue
        ds = _base(CT_IMAGE, study, series, frame_of_reference)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * slice_gap * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in spacing]
        ds.SliceThickness = f"{slice_gap:g}"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = (
            f"{rescale[0]:g}",
            f"{rescale[1]:g}",
            "HU",
        )
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.int16)).tobytes()
        path = folder / f"S{seed}IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    path: Path,
    stored: np.ndarray,
    orientation: Sequence[float] = OBLIQUE,
    spacing: tuple[float, float] = (0.9, 0.7),
    slice_gap: float = 2.5,
    origin: Sequence[float] = (-20.0, 13.0, 40.0),
    rescale: tuple[float, float] = (0.5, -1024.0),
    seed: int = 0,
) -> Path:
    """Write `stored` (X, Y, Z) int16 as one Enhanced CT file whose frames are in shuffled order
    (plane positions per frame; orientation, spacing and rescale in the shared functional
    groups)."""
    orientation = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    ds = _base(
        ENHANCED_CT_IMAGE,
        "1.2.826.0.1.3680043.8.498.1",
        generate_uid(),
        "1.2.826.0.1.3680043.8.498.2",
    )
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = stored.shape[1], stored.shape[0], stored.shape[2]
    shared = Dataset()
    measures, plane, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [f"{v:g}" for v in spacing], f"{slice_gap:g}"
    plane.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = (
        f"{rescale[0]:g}",
        f"{rescale[1]:g}",
        "HU",
    )
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    order = np.random.default_rng(seed).permutation(stored.shape[2])
    per_frame = []
    for k in order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [
            f"{v:.6f}" for v in np.asarray(origin) + k * slice_gap * normal
        ]
        item.PlanePositionSequence = DicomSequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    frames = np.stack([stored[:, :, k].T for k in order]).astype(np.int16)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def pixel_lps(path: Path, row: int, column: int) -> np.ndarray:
    """The LPS position (mm) of pixel (row, column) of a single-frame file, straight from its
    header."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        + column * column_spacing * orientation[:3]
        + row * row_spacing * orientation[3:]
    )
