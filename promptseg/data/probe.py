"""Header-only look at an input: what reading it would cost, and the problems its header shows.

`promptseg segment` probes every query before anything is written, then reads a query fully once:
up front when it fits in the bytes it may keep (so that its data is validated before any output
too), else when it is segmented. Probing decodes no pixel or voxel data.
"""

from __future__ import annotations

import os

import numpy as np

from promptseg.data.dicom import is_dicom_input
from promptseg.data.io import (
    _DEFLATE_MAX_RATIO,
    NIFTI_EXTENSIONS,
    NUMPY_EXTENSIONS,
    PILLOW_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    _load_nibabel,
    check_claimed_size,
    check_is_file,
    opened_pillow_image,
    stored_array_shape,
)
from promptseg.errors import InputError, is_out_of_memory, short_reason
from promptseg.files import file_extension

# Bytes per element assumed for data whose header gives no type (the decoded array's float32).
_DEFAULT_ITEMSIZE = 4


def decoded_bytes(path: str | os.PathLike, series: str | None = None) -> int:
    """About the bytes that reading `path` (read_input) holds in memory, from its header alone.

    InputError naming the file for what the header already shows: a missing file, an unsupported
    type, an unreadable header, a size beyond max_pixels() or beyond what the file can hold (as the
    full read would report). DICOM inputs (and a `series` of one) are estimated by the size of their
    files, NumPy archives by their array's header."""
    path = os.fsdecode(path)
    ext = file_extension(path)
    if series is not None or (ext not in SUPPORTED_EXTENSIONS and is_dicom_input(path)):
        return _files_bytes(path)
    if ext not in SUPPORTED_EXTENSIONS:
        raise InputError(path, f"unsupported file type '{ext or os.path.basename(path)}'")
    check_is_file(path)
    try:
        if ext in NIFTI_EXTENSIONS:
            return _nifti_bytes(path)
        if ext in PILLOW_EXTENSIONS:
            return _pillow_bytes(path)
        assert ext in NUMPY_EXTENSIONS
        shape = stored_array_shape(path)
        return os.path.getsize(path) if shape is None else _count(shape) * 8
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 (as io._read: a damaged header is one line)
        if is_out_of_memory(exc):
            raise InputError(path, "not enough memory to read this image") from None
        raise InputError(path, f"unreadable or corrupt image ({short_reason(exc)})") from None


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.float64))


def _nifti_bytes(path: str) -> int:
    """The voxel data's bytes as read (scaled data: float64), the claimed size checked."""
    image = _load_nibabel(path)
    stored = os.path.getsize(path)
    capacity = stored * _DEFLATE_MAX_RATIO if path.lower().endswith(".gz") else stored
    itemsize = image.get_data_dtype().itemsize
    check_claimed_size(path, tuple(image.shape), itemsize, capacity, what="voxels")
    slope, inter = image.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    return _count(tuple(image.shape)) * (8 if scaled else itemsize)


def _pillow_bytes(path: str) -> int:
    """The decoded image's bytes (width x height x bands x bytes per sample), the claimed size
    checked."""
    with opened_pillow_image(path) as image:
        width, height = image.size
        bands = len(image.getbands())
        sample = 1 if image.mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA") else 4
    return width * height * max(bands, 1) * sample or _DEFAULT_ITEMSIZE


def _files_bytes(path: str) -> int:
    """The bytes of the files at `path` (a file, or a folder and its subfolders)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total
