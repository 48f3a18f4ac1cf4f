"""DICOM input (promptseg.data.dicom): series folders and multi-frame files generated with pydicom."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_helpers import OBLIQUE, pixel_lps, write_multiframe, write_series

from promptseg.data.dicom import read_dicom
from promptseg.data.io import read_image
from promptseg.errors import InputError


def stored_volume(shape: tuple[int, int, int] = (12, 10, 6), seed: int = 0) -> np.ndarray:
    """(X, Y, Z) int16 stored values with distinct values per voxel position."""
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.int16)


def test_series_folder_shuffled_oblique_rescaled(tmp_path: Path) -> None:
    stored = stored_volume()
    paths = write_series(tmp_path / "ct", stored, rescale=(0.5, -1024.0))
    data = read_image(tmp_path / "ct")  # the io reader dispatches a folder to DICOM
    assert data.is_volume and data.array.shape == stored.shape and data.array.dtype == np.float32
    np.testing.assert_array_equal(data.array, stored.astype(np.float32) * 0.5 - 1024.0)
    # Each voxel's world position (RAS, from the affine) is the DICOM pixel position (LPS, from the
    # file's own header) with x and y negated.
    for k, column, row in [(0, 0, 0), (3, 7, 2), (5, 11, 9)]:
        ras = (data.affine @ [column, row, k, 1])[:3]
        np.testing.assert_allclose(ras, pixel_lps(paths[k], row, column) * [-1, -1, 1], atol=1e-4)
    assert data.dicom is not None and [Path(ds.filename) for ds in data.dicom.datasets] == paths


def test_nifti_written_from_dicom_keeps_geometry(tmp_path: Path) -> None:
    from promptseg.data.io import write_nifti_like

    data = read_dicom(write_series(tmp_path / "ct", stored_volume())[0].parent)
    write_nifti_like(tmp_path / "mask.nii.gz", (data.array > 0).astype(np.uint8), data)
    image = nib.load(tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(image.affine, data.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), data.array > 0)


def test_multiframe_file_equals_series(tmp_path: Path) -> None:
    stored = stored_volume(seed=1)
    series = read_dicom(write_series(tmp_path / "ct", stored)[0].parent)
    frames = read_dicom(write_multiframe(tmp_path / "enhanced.dcm", stored))
    np.testing.assert_array_equal(frames.array, series.array)
    np.testing.assert_allclose(frames.affine, series.affine, atol=1e-6)
    assert frames.dicom is not None and frames.dicom.multiframe and sorted(frames.dicom.frame_order) == list(range(6))


def test_single_file_of_a_series_is_one_slice(tmp_path: Path) -> None:
    stored = stored_volume()
    paths = write_series(tmp_path / "ct", stored)
    data = read_image(paths[2])
    assert data.array.shape == (12, 10, 1)
    np.testing.assert_array_equal(data.array[:, :, 0], stored[:, :, 2] * 0.5 - 1024.0)


def test_several_series_are_named_and_one_can_be_chosen(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", stored_volume(), series_uid="1.2.3.1", description="axial")
    write_series(tmp_path / "mixed", stored_volume(seed=2), series_uid="1.2.3.2", seed=5)
    with pytest.raises(InputError) as caught:
        read_image(tmp_path / "mixed")
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "mixed")) and "2 series" in message
    assert "1.2.3.1 (CT 'axial', 6 files)" in message and "1.2.3.2 (CT, 6 files)" in message
    chosen = read_dicom(tmp_path / "mixed", series="1.2.3.2")
    np.testing.assert_array_equal(chosen.array, stored_volume(seed=2) * 0.5 - 1024.0)


def test_missing_slice(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", stored_volume(), skip=(3,))
    with pytest.raises(InputError, match=r"ct: missing slice: a gap of 5 mm .* spacing is 2.5 mm \(1 slice absent\)"):
        read_image(tmp_path / "ct")


def test_duplicated_slice(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume())
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct" / "copy.dcm")
    with pytest.raises(InputError, match="ct: duplicated slices: .* lie at the same position"):
        read_image(tmp_path / "ct")


@pytest.mark.parametrize("change, problem", [
    (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), "mixed orientations in one series"),
    (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]), r"mixed pixel spacings in one series: 0.9x0.7 \(5\), 0.5x0.5 \(1\)"),
    (lambda ds: ds.ImagePositionPatient.__setitem__(2, float(ds.ImagePositionPatient[2]) + 0.7), "uneven slice spacing"),
])
def test_inconsistent_series(tmp_path: Path, change: object, problem: str) -> None:
    paths = write_series(tmp_path / "ct", stored_volume())
    ds = pydicom.dcmread(paths[2])
    change(ds)  # type: ignore[operator]
    ds.save_as(paths[2])
    with pytest.raises(InputError, match=f"ct: {problem}"):
        read_image(tmp_path / "ct")


def test_mixed_sizes(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume())
    small = write_series(tmp_path / "small", stored_volume((8, 10, 6)), seed=3)
    ds = pydicom.dcmread(small[4])
    ds.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    ds.save_as(tmp_path / "ct" / "other.dcm")
    with pytest.raises(InputError, match=r"ct: mixed image sizes in one series: 10x12 \(6\), 10x8 \(1\)"):
        read_image(tmp_path / "ct")


def test_no_pixel_data_and_no_dicom(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume((4, 4, 2)))
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.PixelData, ds.Rows, ds.Columns
        ds.save_as(path)
    with pytest.raises(InputError, match="ct: no pixel data: the DICOM files hold no images"):
        read_image(tmp_path / "ct")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputError, match="empty: no DICOM files in this folder"):
        read_image(tmp_path / "empty")


def test_compressed_without_decoder(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume((4, 4, 2)))
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: compressed, no pydicom decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 8])
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(InputError, match=r"compressed transfer syntax MPEG2 .*\(1.2.840.10008.1.2.4.100\) and no decoder"):
        read_image(tmp_path / "ct")


def test_missing_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_series(tmp_path / "ct", stored_volume((4, 4, 2)))[0].parent
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InputError, match=r"ct: reading DICOM needs pydicom, which is not installed: pip install 'promptseg\[dicom\]'"):
        read_image(folder)


def test_orientation_is_kept(tmp_path: Path) -> None:
    data = read_dicom(write_series(tmp_path / "ct", stored_volume(), spacing=(0.9, 0.7), slice_gap=2.5)[0].parent)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ data.affine
    np.testing.assert_allclose(lps[:3, 0], np.asarray(OBLIQUE[:3]) * 0.7, atol=1e-6)
    np.testing.assert_allclose(lps[:3, 1], np.asarray(OBLIQUE[3:]) * 0.9, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(lps[:3, 2]), 2.5, atol=1e-6)
