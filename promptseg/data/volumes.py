"""The one rule for "is this a volume", used by the readers, the API and the CLI commands.

A 3D array is a volume (segmented slice by slice) when it comes with a geometry (NIfTI, DICOM), or
when neither its first nor its last axis could be a channel axis (length 1, 3 or 4): an (X, Y, Z)
.npy array is a volume, (H, W, C) and (C, H, W) arrays are 2D images. Everything else is a 2D
image or is refused. An array handed to Segmenter.segment_volume is a volume by the caller's word.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CHANNEL_COUNTS = (1, 3, 4)  # lengths of a channel axis: grey, RGB, RGBA
NUMPY_EXTENSIONS = (".npy", ".npz")


def is_volume_shape(shape: Sequence[int], has_geometry: bool) -> bool:
    """Whether an array of `shape` is a volume: 3D, and with a geometry or without a channel axis at
    either end (see the module docstring)."""
    if len(shape) != 3:
        return False
    return has_geometry or (shape[0] not in CHANNEL_COUNTS and shape[-1] not in CHANNEL_COUNTS)


def has_volume_outputs(path: str | os.PathLike) -> bool:
    """Whether a query's outputs are NIfTI volumes, decided before the query is read: NIfTI files
    and DICOM series, and .npy/.npz arrays that are volumes by is_volume_shape (from the array's
    header alone). Unreadable arrays answer False; reading them reports the problem."""
    from promptseg.data.dicom import is_dicom_input  # here: dicom and io import this module's users
    from promptseg.data.io import NIFTI_EXTENSIONS, stored_array_shape
    from promptseg.files import file_extension

    path = os.fspath(path)
    extension = file_extension(path)
    if extension in NIFTI_EXTENSIONS:
        return True
    if extension in NUMPY_EXTENSIONS:
        shape = stored_array_shape(path)
        return shape is not None and is_volume_shape(shape, has_geometry=False)
    return is_dicom_input(path)
