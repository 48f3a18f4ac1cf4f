"""Reading and writing single images and volumes (DESIGN.md section 4).

Supported inputs: NIfTI (.nii, .nii.gz), PNG, TIFF, BMP, JPEG and NumPy (.npy, .npz). Every failure to
read an input is reported as one InputError line naming the file; outputs are written atomically.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from PIL import Image

from promptseg.errors import InputError, short_reason

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
PILLOW_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
NUMPY_EXTENSIONS = (".npy", ".npz")
SUPPORTED_EXTENSIONS = NIFTI_EXTENSIONS + PILLOW_EXTENSIONS + NUMPY_EXTENSIONS


@dataclass
class ImageData:
    """One image or volume as stored on disk.

    array: 2D images (H, W) or (H, W, C); volumes (X, Y, Z) in stored voxel order.
    affine/header: the NIfTI geometry (4x4 voxel-to-world) and header; None for other formats.
    """

    array: np.ndarray
    is_volume: bool
    affine: np.ndarray | None
    header: Any | None
    path: str


def file_extension(path: str | os.PathLike) -> str:
    """The lower-case extension of `path`, treating ".nii.gz" as one extension ("" when none)."""
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(name)[1]


def strip_extension(name: str) -> str:
    """`name` without its (possibly double, ".nii.gz") extension."""
    ext = file_extension(name)
    return name[: len(name) - len(ext)] if ext else name


def read_image(path: str | os.PathLike) -> ImageData:
    """Read one image or volume; see ImageData for the array layout. Raises InputError on bad input."""
    return _read(os.fspath(path), label=False)


def read_label(path: str | os.PathLike) -> ImageData:
    """Read an integer label map: (H, W) for 2D, (X, Y, Z) for 3D.

    Float maps holding integer values are cast to the smallest unsigned integer type that fits; a
    grayscale-looking RGB(A) map (identical channels) is reduced to one channel. Raises InputError
    "label map must hold integers" for fractional or non-finite values, and on negative values.
    """
    path = os.fspath(path)
    data = _read(path, label=True)
    array = data.array
    if not data.is_volume and array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(array.shape[-1], 3))):
            raise InputError(path, f"label map must have one channel, got shape {array.shape}")
        array = array[..., 0]
    data.array = _as_label_values(array, path)
    return data


def _as_label_values(array: np.ndarray, path: str) -> np.ndarray:
    """Validate that `array` holds non-negative integers; return it in an unsigned integer type."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(path, "label map must hold integers (found NaN or Inf)")
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise InputError(path, f"label map must hold integers (found {fractional.flat[0]:g})")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(path, f"label map must hold integers (found data type {array.dtype})")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise InputError(path, f"label map must hold non-negative integers (found {low:g})")
    if high > np.iinfo(np.uint64).max:  # only floats get here
        raise InputError(path, f"label map values must fit 64-bit integers (found {high:g})")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.uint64, copy=False)


def _read(path: str, label: bool) -> ImageData:
    """Dispatch on the extension, load fully inside one try, and check the resulting shape."""
    ext = file_extension(path)
    if ext not in SUPPORTED_EXTENSIONS:
        from promptseg.data import dicom  # here: promptseg.data.dicom imports this module

        if dicom.is_dicom_input(path):  # a series folder, a .dcm file or a file with the DICOM magic bytes
            return dicom.read_dicom(path)
        raise InputError(path, f"unsupported file type '{ext or os.path.basename(path)}'")
    if not os.path.isfile(path):
        problem = "is a folder, expected a file" if os.path.isdir(path) else "file not found"
        raise InputError(path, problem)
    try:
        if ext in NIFTI_EXTENSIONS:
            array, affine, header = _load_nifti(path)
        elif ext in PILLOW_EXTENSIONS:
            array, affine, header = _load_pillow(path, label), None, None
        else:
            array, affine, header = _load_numpy(path, ext, label), None, None
    except InputError:
        raise
    except Exception as exc:  # any library failure on a corrupt or truncated file becomes one line
        raise InputError(path, f"unreadable or corrupt image ({short_reason(exc)})") from None
    array = check_image_array(array, path)
    is_volume = array.ndim == 3 and (affine is not None or array.shape[-1] not in (1, 3, 4))
    return ImageData(array=array, is_volume=is_volume, affine=affine, header=header, path=path)


def check_image_array(array: np.ndarray, source: str | None) -> np.ndarray:
    """Validate an image or volume array (from a file or a caller); raise InputError naming `source`.

    Accepts bool, integer and real floating data of 2 or 3 dimensions (a trailing axis of length 1
    after three is dropped) with at least one element; returns the (possibly squeezed) array.
    """
    if array.dtype.kind not in "biuf":
        raise InputError(source, f"unreadable or corrupt image (unsupported data type {array.dtype})")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise InputError(source, f"{array.ndim}D input is not supported (shape {array.shape})")
    if array.ndim < 2:
        raise InputError(source, f"expected a 2D image or a 3D volume, got shape {array.shape}")
    if array.size == 0:
        raise InputError(source, f"image is empty (shape {array.shape})")
    return array


# Deflate cannot compress better than 1032:1, so a .nii.gz of n bytes holds at most about 1032 n bytes.
_DEFLATE_MAX_RATIO = 1032


def _load_nifti(path: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load a NIfTI file fully (so truncated gzip streams fail here); returns (array, affine, header).

    A header claiming more voxel data than the file can hold (a corrupt or hostile size field) is
    refused before any buffer of that size is allocated.
    """
    image = nib.load(path)
    claimed = int(np.prod(image.shape, dtype=np.float64) * image.get_data_dtype().itemsize)
    stored = os.path.getsize(path)
    capacity = stored * _DEFLATE_MAX_RATIO if path.lower().endswith(".gz") else stored
    if claimed > capacity:
        raise InputError(
            path, f"unreadable or corrupt image (truncated: the header claims {claimed} bytes of voxel data, "
            f"the file can hold at most {capacity})"
        )
    array = np.asarray(image.dataobj)
    return array, np.asarray(image.affine, dtype=np.float64), image.header.copy()


def _load_pillow(path: str, label: bool) -> np.ndarray:
    """Decode a 2D image with Pillow: (H, W) for L/I;16/I/F/1 modes, (H, W, 3|4) for colour.

    Palette (P) images give their palette indices for label maps and their colours for images.
    """
    with Image.open(path) as image:
        image.load()
        if getattr(image, "n_frames", 1) > 1:
            raise InputError(path, f"multi-page images are not supported ({image.n_frames} pages)")
        mode = image.mode
        if mode == "P" and not label:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode == "PA":
            image = image.convert("RGBA")
        elif mode == "LA":
            image = image.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        elif mode == "1":
            return np.asarray(image, dtype=np.uint8)
        array = np.asarray(image)
    if array.dtype.byteorder == ">":  # I;16B and friends
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _load_numpy(path: str, ext: str, label: bool) -> np.ndarray:
    """Load a .npy array, or from an .npz the array "label"/"image" (by role) or else the first one."""
    if ext == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        if not keys:
            raise InputError(path, "image is empty (the archive holds no arrays)")
        preferred = ("label", "image") if label else ("image", "label")
        key = next((k for k in preferred if k in keys), keys[0])
        return np.asarray(archive[key])


def _default_file_mode() -> int:
    """The mode open() gives new files under this process's umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None], overwrite: bool = False) -> None:
    """Call `writer(temporary_path)` then move the result onto `path` in one step (see atomic_write_unchecked).

    If `writer` raises, the temporary file is removed and the exception propagates: `path` is never
    left half-written. An existing `path` is refused unless `overwrite`. Missing parent folders are
    created. A failure of the file system (disk full, no permission) is an InputError naming `path`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(path, "output path is a folder, expected a file name")
    if os.path.exists(path) and not overwrite:
        raise InputError(path, "output exists; pass --overwrite to replace it")
    try:
        atomic_write_unchecked(path, writer, overwrite)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and os.path.exists(path):  # another process created it meanwhile
            raise InputError(path, "output exists (created while writing); pass --overwrite to replace it") from None
        raise InputError(path, f"cannot write output ({short_reason(exc)})") from None


def atomic_write_unchecked(path: str | os.PathLike, writer: Callable[[str], None], overwrite: bool) -> None:
    """atomic_write without its checks and messages: file-system failures propagate as OSError.

    `writer(temporary_path)` fills a temporary file in `path`'s folder (created when missing) that keeps
    `path`'s extension (writers such as nibabel choose the format from it). The file gets the mode the
    umask gives, is flushed to the disk, then moved onto `path` (replacing it if `overwrite`, else
    FileExistsError when `path` exists by then), and the folder is flushed: `path` is always absent,
    the old file or the complete new one. On any failure the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{strip_extension(os.path.basename(path))}.", suffix=file_extension(path)
    )
    os.close(fd)
    try:
        writer(temporary)
        os.chmod(temporary, _FILE_MODE)  # mkstemp makes owner-only files; outputs get the usual mode
        _fsync(temporary)
        if overwrite:
            os.replace(temporary, path)
        else:
            _create_exclusively(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    if os.name == "posix":  # folders cannot be opened for fsync elsewhere
        _fsync(folder)


def _fsync(path: str) -> None:
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusively(temporary: str, path: str) -> None:
    """Move `temporary` to `path` in one step unless `path` exists by now (FileExistsError): a file
    another process wrote meanwhile is never replaced. Where hard links are unsupported, rename."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.exists(path):
            raise FileExistsError(path) from None
        os.replace(temporary, path)
    else:
        os.remove(temporary)


def write_nifti_like(
    path: str | os.PathLike, array: np.ndarray, reference: ImageData, overwrite: bool = False
) -> None:
    """Write `array` (same spatial shape as `reference.array`) as NIfTI in the reference's space.

    Bool and integer arrays (label maps) are stored as uint8 (uint16 when values exceed 255), float
    arrays (probabilities) as float32. The reference's affine and header are kept (intensity scaling
    reset), also an affine nibabel cannot turn into a qform (singular or non-finite), which is written
    back as stored in the reference header; a non-NIfTI reference gets an identity affine and a fresh header.
    """
    array = np.asarray(array)
    if array.shape != reference.array.shape[: array.ndim] or array.ndim not in (2, 3):
        raise ValueError(f"array shape {array.shape} does not match reference shape {reference.array.shape}")
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        dtype = np.uint8 if array.size == 0 or (array.min() >= 0 and array.max() <= 255) else np.uint16
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise ValueError("label values must lie in 0..65535")
    elif np.issubdtype(array.dtype, np.floating):
        dtype = np.float32
    else:
        raise ValueError(f"cannot write data type {array.dtype} as NIfTI")
    data = array.astype(dtype)
    if reference.header is not None and reference.affine is not None:
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        try:
            image = image_class(data, reference.affine, header=header)
        except HeaderDataError:  # an affine with no qform (singular, non-finite): keep the stored header's geometry
            image = image_class(data, None, header=header)
    else:
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_data_dtype(dtype)
    atomic_write(path, lambda temporary: nib.save(image, temporary), overwrite=overwrite)


def write_png(path: str | os.PathLike, array: np.ndarray, overwrite: bool = False) -> None:
    """Write a uint8 image, (H, W) grayscale or (H, W, 3|4) RGB(A), as PNG (atomically)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8 data, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"write_png needs (H, W) or (H, W, 3|4), got shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"), overwrite=overwrite)


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise InputError("axis", f"must be 0, 1 or 2, got {axis}")


def slice_volume(volume: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) volume -> (S, H, W) view of its slices along `axis` (S = volume.shape[axis])."""
    _check_axis(axis)
    if volume.ndim != 3:
        raise InputError(None, f"expected a 3D volume, got shape {volume.shape}")
    return np.moveaxis(volume, axis, 0)


def stack_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """(S, H, W) slices -> the volume they were cut from along `axis` (inverse of slice_volume)."""
    _check_axis(axis)
    if slices.ndim != 3:
        raise InputError(None, f"expected (S, H, W) slices, got shape {slices.shape}")
    return np.moveaxis(slices, 0, axis)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically."""

    def writer(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, writer, overwrite=overwrite)
