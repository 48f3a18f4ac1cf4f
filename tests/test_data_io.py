"""Reading, writing and slicing single images and volumes (promptseg.data.io), on generated
files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from promptseg.data.io import (
    ImageData,
    read_image,
    read_label,
    slice_volume,
    stack_slices,
    write_nifti_like,
    write_png,
)
from promptseg.data.preprocess import normalize_intensity
from promptseg.errors import InputError
from promptseg.files import atomic_write

RNG = np.random.default_rng(0)


def _affine() -> np.ndarray:
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return affine


def _save_nifti(path: Path, array: np.ndarray) -> None:
    image = nib.Nifti1Image(array, _affine())
    image.header["descrip"] = b"promptseg test"
    nib.save(image, str(path))


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(7, 6, 5), (7, 6), (7, 6, 1)])
def test_nifti_round_trip_keeps_affine_and_header(
    tmp_path: Path, ext: str, shape: tuple[int, ...]
) -> None:
    array = RNG.integers(0, 4, size=shape).astype(np.int16)
    source = tmp_path / f"scan{ext}"
    _save_nifti(source, array)
    data = read_image(source)
    assert data.array.shape == shape and data.is_volume == (len(shape) == 3)
    np.testing.assert_array_equal(data.array, array)
    np.testing.assert_allclose(data.affine, _affine())

    out = tmp_path / f"seg{ext}"
    write_nifti_like(out, data.array, data)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, _affine())
    assert written.header["descrip"].tobytes().startswith(b"promptseg test")
    np.testing.assert_allclose(written.header.get_zooms()[:2], (0.8, 0.9))
    label = read_label(out)
    np.testing.assert_array_equal(label.array, array)

    probabilities = tmp_path / f"prob{ext}"
    write_nifti_like(probabilities, RNG.random(shape), data)
    assert nib.load(str(probabilities)).get_data_dtype() == np.float32


def test_4d_nifti_with_one_frame_is_squeezed(tmp_path: Path) -> None:
    _save_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6, 1), np.uint8) + 1)
    assert read_image(tmp_path / "a.nii.gz").array.shape == (4, 5, 6)


def test_4d_nifti_is_refused(tmp_path: Path) -> None:
    _save_nifti(tmp_path / "a.nii.gz", np.ones((4, 5, 6, 2), np.uint8))
    with pytest.raises(
        InputError, match=r"a\.nii\.gz: 4D input is not supported \(shape \(4, 5, 6, 2\)\)"
    ):
        read_image(tmp_path / "a.nii.gz")


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", RNG.integers(0, 256, (9, 11)).astype(np.uint8)),
        ("RGB", RNG.integers(0, 256, (9, 11, 3)).astype(np.uint8)),
        ("RGBA", RNG.integers(0, 256, (9, 11, 4)).astype(np.uint8)),
        ("I;16", RNG.integers(0, 65536, (9, 11)).astype(np.uint16)),
    ],
)
@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_lossless_2d_round_trip(tmp_path: Path, mode: str, array: np.ndarray, ext: str) -> None:
    if ext == ".bmp" and mode in ("I;16", "RGBA"):
        pytest.skip("BMP holds 8-bit L and RGB only")
    path = tmp_path / f"img{ext}"
    Image.fromarray(array).save(path)
    data = read_image(path)
    assert not data.is_volume and data.affine is None and data.header is None
    np.testing.assert_array_equal(data.array, array)


def test_32bit_integer_and_float_tiff(tmp_path: Path) -> None:
    for array in (
        RNG.integers(-5, 70000, (6, 7)).astype(np.int32),
        RNG.random((6, 7)).astype(np.float32),
    ):
        Image.fromarray(array).save(tmp_path / "x.tif")
        np.testing.assert_array_equal(read_image(tmp_path / "x.tif").array, array)


def test_palette_png_gives_colours_for_images_and_indices_for_labels(tmp_path: Path) -> None:
    indices = RNG.integers(0, 3, (8, 8)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").array.shape == (8, 8, 3)
    np.testing.assert_array_equal(read_label(tmp_path / "p.png").array, indices)


def test_jpeg_round_trip_is_approximate(tmp_path: Path) -> None:
    smooth = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 3
    rgb = np.stack([smooth, smooth[::-1], smooth.T], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "b.jpeg", quality=95)
    a, b = read_image(tmp_path / "a.jpg").array, read_image(tmp_path / "b.jpeg").array
    assert a.shape == (32, 32, 3) and b.shape == (32, 32)
    assert np.abs(a.astype(int) - rgb).mean() < 3 and np.abs(b.astype(int) - smooth).mean() < 3


def test_numpy_files(tmp_path: Path) -> None:
    volume = RNG.random((5, 6, 7)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    data = read_image(tmp_path / "v.npy")
    assert data.is_volume and np.array_equal(data.array, volume)
    rgb = RNG.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    assert not read_image(tmp_path / "rgb.npy").is_volume

    label = RNG.integers(0, 3, (5, 6)).astype(np.int64)
    np.savez(tmp_path / "pair.npz", image=volume[0], label=label)
    np.testing.assert_array_equal(read_image(tmp_path / "pair.npz").array, volume[0])
    np.testing.assert_array_equal(read_label(tmp_path / "pair.npz").array, label)
    np.savez_compressed(tmp_path / "one.npz", something=volume)
    np.testing.assert_array_equal(read_image(tmp_path / "one.npz").array, volume)


def test_float_label_with_integer_values_is_cast(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.array([[0.0, 1.0], [2.0, 300.0]]))
    label = read_label(tmp_path / "l.npy").array
    assert label.dtype == np.uint16 and label.tolist() == [[0, 1], [2, 300]]


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (np.array([[0.0, 0.5]]), "label map must hold integers"),
        (np.array([[0.0, np.nan]]), "label map must hold integers"),
        (np.array([[0, -1]]), "label map must hold non-negative integers"),
    ],
)
def test_bad_label_values(tmp_path: Path, values: np.ndarray, problem: str) -> None:
    np.save(tmp_path / "l.npy", values)
    with pytest.raises(InputError, match=problem):
        read_label(tmp_path / "l.npy")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "scan.xyz").write_bytes(b"data")
    with pytest.raises(InputError, match=r"unsupported file type '\.xyz'"):
        read_image(tmp_path / "scan.xyz")


@pytest.mark.parametrize(
    "name",
    ["bad.png", "bad.jpg", "bad.tif", "bad.bmp", "bad.nii", "bad.nii.gz", "bad.npy", "bad.npz"],
)
def test_random_bytes_are_reported_as_corrupt(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(RNG.integers(0, 256, 2000).astype(np.uint8).tobytes())
    with pytest.raises(InputError, match=r"unreadable or corrupt image \(.+\)$") as caught:
        read_image(tmp_path / name)
    assert "\n" not in str(caught.value)


def test_truncated_png_is_corrupt(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64)).astype(np.uint8)).save(tmp_path / "a.png")
    blob = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="unreadable or corrupt image"):
        read_image(tmp_path / "a.png")


def test_truncated_nifti_gz_fails_on_read(tmp_path: Path) -> None:
    _save_nifti(tmp_path / "full.nii.gz", RNG.random((20, 20, 20)).astype(np.float32))
    blob = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: unreadable or corrupt image"):
        read_image(tmp_path / "cut.nii.gz")
    # header intact but the data stream ends early
    raw = gzip.decompress(blob)
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(InputError, match="unreadable or corrupt image"):
        read_image(tmp_path / "short.nii.gz")


def test_empty_image(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", np.zeros((0, 5), np.float32))
    with pytest.raises(InputError, match="image is empty"):
        read_image(tmp_path / "e.npy")


def test_non_finite_intensities_fail_normalisation(tmp_path: Path) -> None:
    image = RNG.random((6, 6)).astype(np.float32)
    image[2, 3] = np.inf
    np.save(tmp_path / "inf.npy", image)
    data = read_image(tmp_path / "inf.npy")
    with pytest.raises(InputError, match="inf.npy: image contains non-finite intensities"):
        normalize_intensity(data.array, data.path)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    def failing(temporary: str) -> None:
        Path(temporary).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "out.png", failing)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_png(target, np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="output exists; pass --overwrite to replace it"):
        write_png(target, np.full((4, 4), 9, np.uint8))
    assert read_image(target).array.max() == 0
    write_png(target, np.full((4, 4, 3), 9, np.uint8), overwrite=True)
    assert read_image(target).array.shape == (4, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_png_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((4, 4), np.float32))


def test_write_nifti_like_a_png_reference_uses_identity(tmp_path: Path) -> None:
    reference = ImageData(np.zeros((4, 5), np.uint8), False, None, None, "ref.png")
    write_nifti_like(tmp_path / "m.nii.gz", np.ones((4, 5), bool), reference)
    written = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(written.affine, np.eye(4))
    assert written.get_data_dtype() == np.uint8 and np.asarray(written.dataobj).min() == 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_and_stack_round_trip(axis: int) -> None:
    volume = RNG.random((3, 4, 5))
    slices = slice_volume(volume, axis)
    assert slices.shape[0] == volume.shape[axis]
    np.testing.assert_array_equal(slices[1], np.take(volume, 1, axis=axis))
    np.testing.assert_array_equal(stack_slices(slices, axis), volume)


@pytest.mark.parametrize("axis", [-1, 3])
def test_bad_axis(axis: int) -> None:
    with pytest.raises(InputError, match="axis: must be 0, 1 or 2"):
        slice_volume(np.zeros((2, 2, 2)), axis)
    with pytest.raises(InputError, match="axis: must be 0, 1 or 2"):
        stack_slices(np.zeros((2, 2, 2)), axis)
