"""DICOM input (promptseg.data.dicom): series folders and multi-frame files generated with
pydicom."""

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
    assert (
        frames.dicom is not None
        and frames.dicom.multiframe
        and sorted(frames.dicom.frame_order) == list(range(6))
    )


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
    with pytest.raises(
        InputError,
        match=r"ct: missing slice: a gap of 5 mm .* spacing is 2.5 mm \(1 slice absent\)",
    ):
        read_image(tmp_path / "ct")


def test_duplicated_slice(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume())
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct" / "copy.dcm")
    with pytest.raises(InputError, match="ct: duplicated slices: .* lie at the same position"):
        read_image(tmp_path / "ct")


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
            "mixed orientations in one series",
        ),
        (
            lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]),
            r"mixed pixel spacings in one series: 0.9x0.7 \(5\), 0.5x0.5 \(1\)",
        ),
        (
            lambda ds: ds.ImagePositionPatient.__setitem__(
                2, float(ds.ImagePositionPatient[2]) + 0.7
            ),
            "uneven slice spacing",
        ),
    ],
)
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
    with pytest.raises(
        InputError, match=r"ct: mixed image sizes in one series: 10x12 \(6\), 10x8 \(1\)"
    ):
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
    ds.file_meta.TransferSyntaxUID = (
        "1.2.840.10008.1.2.4.100"  # MPEG2: compressed, no pydicom decoder
    )
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 8])
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(
        InputError,
        match=r"compressed transfer syntax MPEG2 .*\(1.2.840.10008.1.2.4.100\) and no decoder",
    ):
        read_image(tmp_path / "ct")


def test_missing_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_series(tmp_path / "ct", stored_volume((4, 4, 2)))[0].parent
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(
        InputError,
        match=r"ct: reading DICOM needs pydicom, which is not installed: pip install "
        r"'promptseg\[dicom\]'",
    ):
        read_image(folder)


def test_orientation_is_kept(tmp_path: Path) -> None:
    data = read_dicom(
        write_series(tmp_path / "ct", stored_volume(), spacing=(0.9, 0.7), slice_gap=2.5)[0].parent
    )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ data.affine
    np.testing.assert_allclose(lps[:3, 0], np.asarray(OBLIQUE[:3]) * 0.7, atol=1e-6)
    np.testing.assert_allclose(lps[:3, 1], np.asarray(OBLIQUE[3:]) * 0.9, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(lps[:3, 2]), 2.5, atol=1e-6)


def test_choose_series_picks_per_folder_and_names_bad_uids(tmp_path: Path) -> None:
    from promptseg.data.dicom import choose_series

    write_series(tmp_path / "mixed", stored_volume(), series_uid="1.2.3.1")
    write_series(tmp_path / "mixed", stored_volume(seed=2), series_uid="1.2.3.2", seed=5)
    write_series(tmp_path / "single", stored_volume(seed=3), series_uid="1.2.3.3", seed=6)
    paths = [str(tmp_path / "mixed"), str(tmp_path / "single"), str(tmp_path / "q.png")]
    assert choose_series(paths, ["1.2.3.2"]) == {
        paths[0]: "1.2.3.2",
        paths[1]: None,
        paths[2]: None,
    }
    assert choose_series(paths, []) == dict.fromkeys(paths)
    with pytest.raises(InputError, match=r"^--series: no DICOM input holds series 1.2.3.9$"):
        choose_series(paths, ["1.2.3.2", "1.2.3.9"])
    with pytest.raises(
        InputError, match=r"mixed: holds several of the --series series \(1.2.3.1, 1.2.3.2\)"
    ):
        choose_series(paths, ["1.2.3.1", "1.2.3.2"])
    with pytest.raises(InputError, match=r"mixed: holds 2 series, .* --series UID: 1.2.3.1 "):
        read_image(tmp_path / "mixed")


def test_claimed_voxels_over_the_limit_refused_before_pixel_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptseg.data import dicom

    folder = write_series(tmp_path / "ct", stored_volume())[0].parent  # 12 x 10 x 6 = 720 voxels
    monkeypatch.setattr(
        dicom, "_pixels", lambda *args, **kwargs: pytest.fail("pixel data was read")
    )
    monkeypatch.setenv("PROMPTSEG_MAX_PIXELS", "719")
    with pytest.raises(InputError) as caught:
        read_image(folder)
    assert str(caught.value) == (
        f"{folder}: too large: the header claims 720 voxels, more than the limit of 719 "
        "(set PROMPTSEG_MAX_PIXELS to raise it)"
    )
    frames = write_multiframe(tmp_path / "enhanced.dcm", stored_volume())
    with pytest.raises(InputError, match="enhanced.dcm: too large: the header claims 720 voxels"):
        read_image(frames)


def test_headers_claiming_more_pixels_than_the_files_hold(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored_volume((4, 4, 2)))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 4000  # 16 million pixels a slice, in files of about 1 kB
        ds.save_as(path)
    with pytest.raises(
        InputError,
        match=r"ct: unreadable or corrupt image \(truncated: the header claims 64000000 "
        r"bytes of voxel data, the file can hold at most \d+\)",
    ):
        read_image(tmp_path / "ct")


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = stored_volume()
    plain = read_dicom(write_series(tmp_path / "m2", stored)[0].parent).array
    paths = write_series(tmp_path / "m1", stored)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    inverted = read_dicom(tmp_path / "m1").array
    # Signed 16 bits stored, slope 0.5, intercept -1024: the stored range maps to [-17408, 15359.5].
    np.testing.assert_array_equal(inverted, np.float32(-17408.0 + 15359.5) - plain)
    frames = write_multiframe(tmp_path / "m1.dcm", stored)
    ds = pydicom.dcmread(frames)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(frames)
    np.testing.assert_array_equal(read_dicom(frames).array, inverted)


def test_simple_layout_lists_series_folders_and_dicom_files(tmp_path: Path) -> None:
    import json

    from promptseg.data.index import load_examples
    from promptseg.data.layouts import nearby_label_names, open_dataset

    root = tmp_path / "ds"
    stored = stored_volume((16, 16, 4))
    write_series(root / "images" / "case0", stored)
    write_multiframe((root / "images").joinpath("case1.dcm"), stored)
    (root / "labels").mkdir()
    series = read_dicom(root / "images" / "case0")
    truth = (stored > 1500).astype(np.uint8)
    for name in ("case0", "case1"):
        nib.save(nib.Nifti1Image(truth, series.affine), root / "labels" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"name": "dcm", "labels": {"background": 0, "lesion": 1}})
    )
    dataset = open_dataset(root)
    assert [
        (c.name, Path(c.image_paths[0]).name, Path(c.label_path).name) for c in dataset.cases
    ] == [("case0", "case0", "case0.nii.gz"), ("case1", "case1.dcm", "case1.nii.gz")]
    images, labels, case_ids = load_examples(dataset, resolution=16, channels=1)
    assert images.shape == (8, 1, 16, 16) and list(case_ids) == ["case0"] * 4 + ["case1"] * 4
    np.testing.assert_array_equal(
        labels[:4], labels[4:]
    )  # the series and the multi-frame file agree
    assert nearby_label_names([root / "images" / "case0"]) == {1: "lesion"}
