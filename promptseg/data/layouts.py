"""Dataset folders: the nnU-Net v2 raw layout and the simple images/ + labels/ layout
(docs/design.md section 4).

nnU-Net v2:  ROOT/dataset.json, ROOT/imagesTr/NAME_0000.ext (one file per channel),
ROOT/labelsTr/NAME.ext
simple:      ROOT/images/NAME.ext, ROOT/labels/NAME.ext (same NAME, any supported extensions),
             optional ROOT/dataset.json; an image may also be a DICOM series folder
             ROOT/images/NAME/ or a DICOM file ROOT/images/NAME.dcm (read by promptseg.data.dicom)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from promptseg.data.dicom import DICOM_EXTENSIONS
from promptseg.data.io import SUPPORTED_EXTENSIONS
from promptseg.errors import InputError, short_reason
from promptseg.files import file_extension, strip_extension

MAX_LABEL_VALUE = (
    2**31 - 1
)  # label maps are read into at most 64-bit integers; values beyond this are damage

_CHANNEL_FILE = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case: its channel files (one for single-channel data) and its label map, if any."""

    name: str
    image_paths: list[str]
    label_path: str | None


@dataclass
class DatasetInfo:
    """A dataset folder: `labels` maps each non-zero label value to its name (empty when
    unnamed)."""

    root: str
    name: str
    labels: dict[int, str]
    modality: str
    cases: list[Case]
    layout: Literal["nnunet", "simple"]


def is_dataset(root: str | os.PathLike) -> bool:
    """Whether `root` looks like a dataset folder of either layout."""
    root = Path(root)
    return (root / "imagesTr").is_dir() or (root / "images").is_dir()


def find_datasets(root: str | os.PathLike) -> list[Path]:
    """[root] when `root` is a dataset folder, else its dataset sub-folders (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    if is_dataset(root):
        return [root]
    found = sorted(child for child in root.iterdir() if child.is_dir() and is_dataset(child))
    if not found:
        raise InputError(root, _NOT_A_DATASET)
    return found


_NOT_A_DATASET = (
    "not a dataset folder: expected imagesTr/ + labelsTr/ + dataset.json (nnU-Net v2) "
    "or images/ + labels/ (simple layout)"
)


def open_dataset(root: str | os.PathLike) -> DatasetInfo:
    """Detect the layout of `root` and list its cases (sorted by name). Raises InputError on bad
    folders."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    meta = _read_dataset_json(root)
    if (root / "imagesTr").is_dir():
        cases, layout = _nnunet_cases(root, meta), "nnunet"
    elif (root / "images").is_dir():
        cases, layout = _simple_cases(root), "simple"
    else:
        raise InputError(root, _NOT_A_DATASET)
    if not cases:
        raise InputError(
            root, f"no images found in {'imagesTr' if layout == 'nnunet' else 'images'}/"
        )
    return DatasetInfo(
        root=str(root),
        name=str(meta.get("name") or root.name),
        labels=_label_names(meta.get("labels"), root),
        modality=_modality(meta),
        cases=cases,
        layout=layout,  # type: ignore[arg-type]
    )


def nearby_label_names(paths: Sequence[str | os.PathLike]) -> dict[int, str]:
    """The label names (value -> name) of the first dataset.json found, trying each of `paths` in
    turn, in the folder holding it or the one above (so ROOT/labelsTr/x.nii.gz, ROOT/images/x.png
    and a series folder ROOT/images/case/ all find ROOT/dataset.json); {} when there is none."""
    for path in paths:
        folder = Path(os.path.abspath(os.fspath(path).rstrip(os.sep))).parent
        for root in (folder, folder.parent):
            if (root / "dataset.json").is_file():
                return _label_names(_read_dataset_json(root).get("labels"), root)
    return {}


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise InputError(path, "unreadable dataset.json (nested too deeply)") from None
    except (
        OSError,
        ValueError,
    ) as exc:  # JSONDecodeError, UnicodeDecodeError, integers of more than 4300 digits
        raise InputError(path, f"unreadable dataset.json ({short_reason(exc)})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "dataset.json must hold a JSON object")
    return meta


def _label_names(labels: Any, root: Path) -> dict[int, str]:
    """dataset.json "labels" -> {value: name} without background.

    Accepts nnU-Net v2 {name: value} and the older {"value": name}; nnU-Net region entries
    ({name: [values]}) name no single value and are skipped.
    """
    if labels is None:
        return {}
    source = root / "dataset.json"
    if not isinstance(labels, dict):
        raise InputError(source, '"labels" must be an object mapping names to values')
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, list):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            number, name = value, str(key)
        elif isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            if len(str(key).strip()) > len(str(MAX_LABEL_VALUE)):
                raise InputError(source, f"label key {str(key)[:20]}... is above {MAX_LABEL_VALUE}")
            number, name = int(key), value
        else:
            raise InputError(
                source, f"label entry {key!r}: {value!r} is neither name -> value nor value -> name"
            )
        if number < 0:
            raise InputError(source, f"label {name!r} has negative value {number}")
        if number > MAX_LABEL_VALUE:
            raise InputError(
                source, f"label {name!r} has value {str(number)[:20]}..., above {MAX_LABEL_VALUE}"
            )
        if number != 0:
            names[number] = name
    return names


def _modality(meta: dict[str, Any]) -> str:
    """dataset.json "modality" (text or nnU-Net v1 {"0": "CT"}) or v2 "channel_names", else
    "unknown"."""
    for key in ("modality", "channel_names"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and value:
            return ", ".join(str(value[k]) for k in sorted(value, key=str))
    return "unknown"


def _image_files(folder: Path, ending: str | None = None, dicom: bool = False) -> list[Path]:
    """Visible files of `folder` with a supported extension (or exactly `ending`), sorted by name;
    with `dicom` also its .dcm/.dicom files and its sub-folders (DICOM series)."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        dicom_file = entry.is_file() and file_extension(entry) in DICOM_EXTENSIONS
        if dicom and (entry.is_dir() or dicom_file):
            files.append(entry)
        elif not entry.is_file():
            continue
        elif (
            entry.name.endswith(ending) if ending else file_extension(entry) in SUPPORTED_EXTENSIONS
        ):
            files.append(entry)
    return files


def _by_name(files: list[Path], folder: Path, ending: str | None = None) -> dict[str, Path]:
    """NAME -> file, refusing two files with one NAME (e.g. a.png and a.jpg)."""
    named: dict[str, Path] = {}
    for path in files:
        if path.is_dir():
            name = path.name
        else:
            name = path.name[: -len(ending)] if ending else strip_extension(path.name)
        if name in named:
            raise InputError(
                folder, f"two files for case '{name}': {named[name].name} and {path.name}"
            )
        named[name] = path
    return named


def _simple_cases(root: Path) -> list[Case]:
    images = _by_name(_image_files(root / "images", dicom=True), root / "images")
    labels_dir = root / "labels"
    labels = _by_name(_image_files(labels_dir), labels_dir) if labels_dir.is_dir() else {}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InputError(
            root, f"label without image: labels/{labels[orphans[0]].name} ({len(orphans)} in all)"
        )
    return [
        Case(
            name=name,
            image_paths=[str(images[name])],
            label_path=str(labels[name]) if name in labels else None,
        )
        for name in sorted(images)
    ]


def _nnunet_cases(root: Path, meta: dict[str, Any]) -> list[Case]:
    if not meta:
        raise InputError(root, "nnU-Net layout (imagesTr/) needs a dataset.json")
    ending = meta.get("file_ending")
    if ending is not None and (not isinstance(ending, str) or not ending.startswith(".")):
        raise InputError(
            root / "dataset.json", f'"file_ending" must look like ".nii.gz", got {ending!r}'
        )
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    channels: dict[str, dict[int, Path]] = {}
    for path in _image_files(images_dir, ending):
        match = _CHANNEL_FILE.match(
            path.name[: -len(ending)] if ending else strip_extension(path.name)
        )
        if match is None:
            raise InputError(
                path, "nnU-Net image files must be named NAME_0000.ext (one per channel)"
            )
        channels.setdefault(match["name"], {})[int(match["channel"])] = path
    labels = (
        _by_name(_image_files(labels_dir, ending), labels_dir, ending)
        if labels_dir.is_dir()
        else {}
    )
    orphans = sorted(set(labels) - set(channels))
    if orphans:
        raise InputError(
            root, f"label without image: labelsTr/{labels[orphans[0]].name} ({len(orphans)} in all)"
        )
    expected = len(meta["channel_names"]) if isinstance(meta.get("channel_names"), dict) else None
    cases = []
    for name in sorted(channels):
        found = channels[name]
        count = expected or len(found)
        if sorted(found) != list(range(count)):
            raise InputError(
                images_dir,
                f"case '{name}' has channels {sorted(found)}, expected 0..{count - 1} "
                "(NAME_0000...)",
            )
        label = str(labels[name]) if name in labels else None
        cases.append(
            Case(name=name, image_paths=[str(found[c]) for c in range(count)], label_path=label)
        )
    return cases
