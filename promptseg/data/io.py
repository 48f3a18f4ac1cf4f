"""Reading and writing single images and volumes (docs/design.md section 4).

Supported inputs: NIfTI (.nii, .nii.gz), PNG, TIFF, BMP, JPEG and NumPy (.npy, .npz). Every failure
to read an input is reported as one InputError line naming the file; outputs are written atomically.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from PIL import Image

from promptseg.data.volumes import CHANNEL_COUNTS, is_volume_shape
from promptseg.errors import InputError, is_out_of_memory, short_reason
from promptseg.files import Writer, atomic_write, file_extension

MAX_PIXELS_VARIABLE = "PROMPTSEG_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2**28  # 268 million pixels or voxels: 1 GiB as float32

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
PILLOW_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
NUMPY_EXTENSIONS = (".npy", ".npz")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
SUPPORTED_EXTENSIONS = NIFTI_EXTENSIONS + PILLOW_EXTENSIONS + NUMPY_EXTENSIONS


@dataclass
class ImageData:
    """One image or volume as stored on disk.

    array: 2D images (H, W) or (H, W, C); volumes (X, Y, Z) in stored voxel order.
    is_volume: by the one rule of promptseg.data.volumes.is_volume_shape.
    affine/header: the NIfTI geometry (4x4 voxel-to-world) and header; None for other formats.
    """

    array: np.ndarray
    is_volume: bool
    affine: np.ndarray | None
    header: Any | None
    path: str


def read_image(path: str | bytes | os.PathLike) -> ImageData:
    """Read one image or volume; see ImageData for the array layout. Raises InputError on bad
    input."""
    return _read(os.fsdecode(path), label=False)


def read_label(path: str | bytes | os.PathLike) -> ImageData:
    """Read an integer label map: (H, W) for 2D, (X, Y, Z) for 3D.

    Float maps holding integer values are cast to the smallest unsigned integer type that fits; a
    grayscale-looking RGB(A) map (identical channels) is reduced to one channel. Raises InputError
    "label map must hold integers" for fractional or non-finite values, and on negative values.
    JPEG masks (lossy: compression rings around edges) are taken as binary masks, thresholded at
    half their range, with a warning.
    """
    path = os.fsdecode(path)
    data = _read(path, label=True)
    array = data.array
    if file_extension(path) in LOSSY_EXTENSIONS:
        array = _binarized_lossy_mask(array, path)
    if not data.is_volume and array.ndim == 3:
        if not all(
            np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(array.shape[-1], 3))
        ):
            raise InputError(path, f"label map must have one channel, got shape {array.shape}")
        array = array[..., 0]
    data.array = as_label_values(array, path)
    return data


def _binarized_lossy_mask(array: np.ndarray, path: str) -> np.ndarray:
    """A JPEG mask snapped to 0 and its type's maximum (255 for 8 bits) at half that range: JPEG
    ringing otherwise turns near-zero pixels around every edge into foreground. Warns once."""
    high = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1.0
    warnings.warn(
        f"{path}: JPEG is lossy; the mask is read as binary, thresholded at half its range "
        f"({high / 2:g}); store masks as PNG to keep exact labels",
        stacklevel=4,
    )
    return np.where(array > high / 2, high, 0).astype(array.dtype)


def as_label_values(array: np.ndarray, path: str | None) -> np.ndarray:
    """Validate that `array` holds non-negative integers; return it in an unsigned integer type.
    InputError naming `path` (a file, or a description of a caller's array) otherwise."""
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
        from promptseg.data import (
            dicom,  # here: promptseg.data.dicom imports this module
        )

        if dicom.is_dicom_input(
            path
        ):  # a series folder, a .dcm file or a file with the DICOM magic bytes
            return dicom.read_dicom(path)
        raise InputError(path, f"unsupported file type '{ext or os.path.basename(path)}'")
    check_is_file(path)
    try:
        if ext in NIFTI_EXTENSIONS:
            array, affine, header = _load_nifti(path)
        elif ext in PILLOW_EXTENSIONS:
            array, affine, header = _load_pillow(path, label), None, None
        else:
            array, affine, header = _load_numpy(path, ext, label), None, None
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "not enough memory to read this image") from None
    except Exception as exc:  # noqa: BLE001 (any library failure on a corrupt or truncated file becomes one line)
        if is_out_of_memory(exc):
            raise InputError(path, "not enough memory to read this image") from None
        raise InputError(path, f"unreadable or corrupt image ({short_reason(exc)})") from None
    array = check_image_array(array, path)
    is_volume = is_volume_shape(array.shape, has_geometry=affine is not None)
    return ImageData(array=array, is_volume=is_volume, affine=affine, header=header, path=path)


def check_is_file(path: str) -> None:
    """InputError naming `path` unless it is an existing file (a folder, or nothing there)."""
    if not os.path.isfile(path):
        problem = "is a folder, expected a file" if os.path.isdir(path) else "file not found"
        raise InputError(path, problem)


def check_image_array(array: np.ndarray, source: str | None) -> np.ndarray:
    """Validate an image or volume array (from a file or a caller); raise InputError naming
    `source`.

    Accepts bool, integer and real floating data of 2 or 3 dimensions (a trailing axis of length 1
    after three is dropped) with at least one element; returns the (possibly squeezed) array.
    """
    if array.dtype.kind not in "biuf":
        raise InputError(
            source, f"unreadable or corrupt image (unsupported data type {array.dtype})"
        )
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise InputError(source, f"{array.ndim}D input is not supported (shape {array.shape})")
    if array.ndim < 2:
        raise InputError(source, f"expected a 2D image or a 3D volume, got shape {array.shape}")
    if array.size == 0:
        raise InputError(source, f"image is empty (shape {array.shape})")
    return array


# Deflate cannot compress better than 1032:1, so a .nii.gz of n bytes holds at most about 1032 n
# bytes.
_DEFLATE_MAX_RATIO = 1032
# Above any image format's honest compression (TIFF's LZW reaches about 2560:1, deflate 1032:1).
_IMAGE_MAX_RATIO = 4096


def max_pixels() -> int:
    """The most pixels (2D) or voxels (3D) one input may hold: $PROMPTSEG_MAX_PIXELS, else
    DEFAULT_MAX_PIXELS.

    Inputs are refused against it from their headers, before their data is decoded."""
    text = os.environ.get(MAX_PIXELS_VARIABLE)
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(MAX_PIXELS_VARIABLE, f"must be a positive integer, got {text!r}")
    return value


def check_claimed_size(
    path: str, shape: tuple[int, ...], itemsize: int, capacity: int, what: str = "pixels"
) -> None:
    """Refuse, before anything is allocated, an input whose header claims more than max_pixels()
    elements (the channels of a pixel count as one) or more data bytes than `capacity`, the most its
    stored bytes can hold (a corrupt or hostile size field)."""
    spatial = shape[:2] if what == "pixels" else shape
    count = int(np.prod(spatial, dtype=np.float64))
    limit = max_pixels()
    if count > limit:
        raise InputError(
            path,
            f"too large: the header claims {count} {what}, more than the limit of {limit} "
            f"(set {MAX_PIXELS_VARIABLE} to raise it)",
        )
    claimed = int(np.prod(shape, dtype=np.float64)) * itemsize
    if claimed > capacity:
        raise InputError(
            path,
            f"unreadable or corrupt image (truncated: the header claims {claimed} bytes of "
            f"{'voxel' if what == 'voxels' else 'pixel'} data, the file can hold at most "
            f"{capacity})",
        )


class _Collector(logging.Handler):
    """A logging handler keeping the messages it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_NIBABEL_LOG_LOCK = threading.Lock()
_REPORTED_REPAIRS: set[tuple[str, str]] = set()


def _load_nibabel(path: str) -> Any:
    """nib.load(path), with the header repairs nibabel logs straight to stderr ("qform_code 7 not
    valid; setting to 0") turned into one `path: ...` warning each, once per file and message
    however often the file is read."""
    logger = nib.imageglobals.logger
    collector = _Collector()
    with _NIBABEL_LOG_LOCK:
        handlers, propagate = logger.handlers, logger.propagate
        logger.handlers, logger.propagate = [collector], False
        try:
            image = nib.load(path)
        finally:
            logger.handlers, logger.propagate = handlers, propagate
        fresh = [m for m in dict.fromkeys(collector.messages) if (path, m) not in _REPORTED_REPAIRS]
        _REPORTED_REPAIRS.update((path, m) for m in fresh)
    for message in fresh:
        warnings.warn(f"{path}: damaged header field repaired on reading ({message})", stacklevel=4)
    return image


def _load_nifti(path: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load a NIfTI file fully (so truncated gzip streams fail here); returns (array, affine,
    header).

    A header claiming more voxel data than the file can hold (a corrupt or hostile size field) is
    refused before any buffer of that size is allocated.
    """
    image = _load_nibabel(path)
    stored = os.path.getsize(path)
    capacity = stored * _DEFLATE_MAX_RATIO if path.lower().endswith(".gz") else stored
    check_claimed_size(
        path, tuple(image.shape), image.get_data_dtype().itemsize, capacity, what="voxels"
    )
    if path.lower().endswith(".gz"):
        check_gzip_stream(path)
    array = np.asarray(image.dataobj)
    return array, np.asarray(image.affine, dtype=np.float64), image.header.copy()


def check_gzip_stream(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a gzip file whose stream is cut off or corrupt: each member must reach its end, where
    zlib checks its CRC-32 and length (nibabel reads only the bytes the voxels need, so a file cut
    after them, or data changed in place, would pass silently). Bytes after the last member that
    do not start another (trailing zeros or garbage) are ignored, as gzip does.

    The file is inflated a block at a time and the output dropped: memory stays small."""
    with open(path, "rb") as handle:
        data = handle.read(chunk_bytes)
        while data[:2] == b"\x1f\x8b":
            inflater = zlib.decompressobj(wbits=31)
            while not inflater.eof:
                if not data:
                    raise InputError(
                        path,
                        "unreadable or corrupt image (truncated: the gzip stream stops before "
                        "its end and checksum)",
                    )
                try:
                    _inflated_size(inflater, data, 1 << 62, chunk_bytes)
                except zlib.error as exc:
                    raise InputError(
                        path, f"unreadable or corrupt image (gzip stream: {short_reason(exc)})"
                    ) from None
                data = inflater.unused_data if inflater.eof else handle.read(chunk_bytes)
            if len(data) < 2:
                data += handle.read(chunk_bytes)


@contextmanager
def opened_pillow_image(path: str) -> Iterator[Image.Image]:
    """Pillow's lazily decoded image of `path`, its header's size checked (check_claimed_size)
    before any pixel is decoded; Pillow's decompression-bomb error is one InputError."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", Image.DecompressionBombWarning
        )  # max_pixels() is the limit that applies
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(
                path,
                f"too large: more pixels than Pillow decodes (set {MAX_PIXELS_VARIABLE} "
                "and PIL.Image.MAX_IMAGE_PIXELS to raise the limits)",
            ) from None
    with opened as image:
        width, height = image.size
        bands = len(image.getbands())
        check_claimed_size(
            path, (height, width, bands), 1, os.path.getsize(path) * _IMAGE_MAX_RATIO
        )
        yield image


def _load_pillow(path: str, label: bool) -> np.ndarray:
    """Decode a 2D image with Pillow: (H, W) for L/I;16/I/F/1 modes, (H, W, 3|4) for colour.

    Palette (P) images give their palette indices for label maps and their colours for images. The
    size in the header is checked (check_claimed_size) before decoding, and PNG pixel data that ends
    before the last row (which Pillow would fill with zeros) is refused (check_png_data).
    """
    with opened_pillow_image(path) as image:
        if image.format == "PNG":
            check_png_data(path)
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _png_row_bytes(width: int, bits_per_pixel: int) -> int:
    """Bytes of one filtered PNG scanline: the filter byte and the packed samples (0 for an empty
    pass)."""
    return 0 if width == 0 else 1 + (width * bits_per_pixel + 7) // 8


def _png_data_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes the decompressed PNG image data must hold (the seven Adam7 passes when interlaced)."""
    if not interlaced:
        return height * _png_row_bytes(width, bits_per_pixel)
    passes = (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )
    total = 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        total += pass_height * _png_row_bytes(pass_width, bits_per_pixel) if pass_width else 0
    return total


def check_png_data(path: str, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a PNG whose image data decompresses to fewer bytes than its header's rows need (a file
    cut off, or a compressed stream that ends cleanly half-way: Pillow fills the missing rows with
    zeros), or whose compressed stream does not reach its end and checksum (cut off after the last
    row, or corrupt: Pillow stops at the last row and never checks it). A checksum that does not
    match, or data that is not deflate, raises zlib.error.

    The data is inflated a block at a time and only counted, so memory stays small whatever it
    claims; beyond _PNG_EXTRA_BYTES more than the rows need, the end is not looked for."""
    with open(path, "rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return  # not a PNG after all: Pillow reports it
        header = handle.read(25)
        if len(header) < 25 or header[4:8] != b"IHDR":
            return
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[8:21])
        expected = _png_data_bytes(
            width, height, depth * _PNG_CHANNELS.get(colour, 1), interlace == 1
        )
        limit = expected + _PNG_EXTRA_BYTES
        inflater, produced = zlib.decompressobj(), 0
        while produced < limit and not inflater.eof:
            head = handle.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                handle.seek(length + 4, os.SEEK_CUR)
                continue
            remaining = length
            while remaining and produced < limit and not inflater.eof:
                data = handle.read(min(remaining, chunk_bytes))
                if not data:
                    break
                remaining -= len(data)
                produced += _inflated_size(inflater, data, limit - produced, chunk_bytes)
            handle.seek(remaining + 4, os.SEEK_CUR)
    if produced < expected:
        raise InputError(
            path,
            f"unreadable or corrupt image (truncated: the pixel data holds {produced} of the "
            f"{expected} bytes its {width}x{height} header needs)",
        )
    if not inflater.eof and produced < limit:
        raise InputError(
            path,
            "unreadable or corrupt image (truncated: the compressed pixel data stops before its "
            "end and checksum)",
        )


# Decompressed bytes beyond what a PNG's rows need that check_png_data inflates to find the
# stream's end (Pillow ignores them).
_PNG_EXTRA_BYTES = 64 * 2**20


def _inflated_size(inflater: zlib._Decompress, data: bytes, wanted: int, chunk_bytes: int) -> int:
    """Feed `data` to `inflater` and count what it gives, up to `wanted` bytes, `chunk_bytes` at a
    time."""
    produced = 0
    while produced < wanted:
        out = inflater.decompress(data, min(chunk_bytes, wanted - produced))
        produced += len(out)
        data = inflater.unconsumed_tail
        if not data and (not out or inflater.eof):  # input used up and no output left pending
            break
    return produced


def _load_numpy(path: str, ext: str, label: bool) -> np.ndarray:
    """Load a .npy array, or from an .npz the array "label"/"image" (by role) or else the first one.

    The shape in the array's header is checked (check_claimed_size) before the data is read."""
    if ext == ".npy":
        with open(path, "rb") as handle:
            shape, dtype = _npy_header(handle)
            check_claimed_size(
                path, shape, dtype.itemsize, os.path.getsize(path) - handle.tell(), _npy_unit(shape)
            )
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        if not keys:
            raise InputError(path, "image is empty (the archive holds no arrays)")
        preferred = ("label", "image") if label else ("image", "label")
        key = next((k for k in preferred if k in keys), keys[0])
        member = archive.zip.getinfo(
            f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
        )
        with archive.zip.open(member) as handle:
            shape, dtype = _npy_header(handle)
        ratio = 1 if member.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
        check_claimed_size(
            path, shape, dtype.itemsize, member.compress_size * ratio, _npy_unit(shape)
        )
        return np.asarray(archive[key])


def _npy_header(handle: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a .npy stream, leaving `handle` at the start of the
    data."""
    version = np.lib.format.read_magic(handle)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = reader(handle, max_header_size=10_000)
    return tuple(int(n) for n in shape), dtype


def _npy_unit(shape: tuple[int, ...]) -> str:
    """What an array's elements are for the pixel limit: voxels of a volume
    (volumes.is_volume_shape)."""
    four_d = len(shape) > 3 and shape[-1] not in CHANNEL_COUNTS
    return "voxels" if four_d or is_volume_shape(shape, has_geometry=False) else "pixels"


def stored_array_shape(path: str) -> tuple[int, ...] | None:
    """The shape of the array that read_image takes from a .npy or .npz file, read from its header
    alone (None when the file cannot be read as one)."""
    try:
        if file_extension(path) == ".npy":
            with open(path, "rb") as handle:
                return _npy_header(handle)[0]
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            key = next(
                (f"{k}.npy" for k in ("image", "label") if f"{k}.npy" in names),
                names[0] if names else None,
            )
            if key is None:
                return None
            with archive.open(key) as handle:
                return _npy_header(handle)[0]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def write_nifti_like(
    path: str | os.PathLike, array: np.ndarray, reference: ImageData, overwrite: bool = False
) -> None:
    """Write `array` (same spatial shape as `reference.array`) as NIfTI in the reference's space
    (atomically; see nifti_writer)."""
    atomic_write(path, nifti_writer(array, reference), overwrite=overwrite)


def nifti_writer(array: np.ndarray, reference: ImageData) -> Writer:
    """A writer storing `array` (same spatial shape as `reference.array`) as NIfTI in the
    reference's space.

    Bool and integer arrays (label maps) are stored as uint8 (uint16 when values exceed 255), float
    arrays (probabilities) as float32. The reference's affine and header are kept (intensity scaling
    reset), also an affine nibabel cannot turn into a qform (singular or non-finite), which is
    written back as stored in the reference header; a non-NIfTI reference gets an identity affine
    and a fresh header.
    """
    array = np.asarray(array)
    if array.shape != reference.array.shape[: array.ndim] or array.ndim not in (2, 3):
        raise ValueError(
            f"array shape {array.shape} does not match reference shape {reference.array.shape}"
        )
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        dtype = (
            np.uint8 if array.size == 0 or (array.min() >= 0 and array.max() <= 255) else np.uint16
        )
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
        except (
            HeaderDataError
        ):  # an affine with no qform (singular, non-finite): keep the stored header's geometry
            image = image_class(data, None, header=header)
    else:
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_data_dtype(dtype)
    return lambda temporary: nib.save(image, temporary)


def write_png(path: str | os.PathLike, array: np.ndarray, overwrite: bool = False) -> None:
    """Write a uint8 image, (H, W) grayscale or (H, W, 3|4) RGB(A), as PNG (atomically)."""
    atomic_write(path, png_writer(array), overwrite=overwrite)


def png_writer(array: np.ndarray) -> Writer:
    """A writer storing a uint8 image, (H, W) grayscale or (H, W, 3|4) RGB(A), as PNG."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8 data, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"write_png needs (H, W) or (H, W, 3|4), got shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    return lambda temporary: image.save(temporary, format="PNG")


def npy_writer(array: np.ndarray) -> Writer:
    """A writer storing `array` as a .npy file."""
    return lambda temporary: np.save(temporary, array)


def canonical_view(array: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """A view of a 3D `array` with its axes permuted and flipped to the closest RAS orientation of
    its voxel-to-world `affine` (nibabel's io_orientation): the same scan stored in any voxel order
    (LPS, RAS, axes swapped) gives the same view, and writing into the view writes the stored grid.

    `array` itself when `affine` is None or gives no orientation (non-finite or singular)."""
    orientation = _closest_ras(affine) if array.ndim == 3 else None
    if orientation is None:
        return array
    return nib.orientations.apply_orientation(array, orientation)


def is_stored_canonical(affine: np.ndarray | None) -> bool:
    """Whether canonical_view leaves a volume of voxel-to-world `affine` in its stored order (its
    closest RAS orientation is the stored one, or it has none)."""
    orientation = _closest_ras(affine)
    return orientation is None or bool(np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]))


def _closest_ras(affine: np.ndarray | None) -> np.ndarray | None:
    """nibabel's io_orientation of `affine` (3, 2), or None when it gives none (no affine,
    non-finite or singular)."""
    if affine is None or not np.all(np.isfinite(affine)):
        return None
    with np.errstate(all="ignore"):
        orientation = nib.orientations.io_orientation(affine)
    return None if np.isnan(orientation).any() else orientation


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
