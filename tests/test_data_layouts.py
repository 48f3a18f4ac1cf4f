"""Dataset folders (promptseg.data.layouts) and the task index (promptseg.data.index), on generated
files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from promptseg.data.index import build_tasks, load_examples
from promptseg.data.layouts import open_dataset
from promptseg.errors import InputError

RNG = np.random.default_rng(1)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _disc_label(size: int, value: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2, value, 0).astype(
        np.uint8
    )


def _simple_2d(root: Path, count: int = 3) -> None:
    """count RGB/JPEG-and-PNG cases with labels 1 (a disc) and 2 (a corner block, first case
    only)."""
    for i in range(count):
        label = _disc_label(40, 1, 8 + i)
        if i == 0:
            label[:6, :6] = 2
        image = RNG.integers(0, 256, (40, 40, 3)).astype(np.uint8)
        if i % 2:
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "images" / f"case{i}.jpg", quality=95)
        else:
            _png(root / "images" / f"case{i}.png", image)
        _png(root / "labels" / f"case{i}.png", label)
    meta = {
        "name": "toy2d",
        "modality": "photo",
        "labels": {"background": 0, "disc": 1, "corner": 2},
    }
    (root / "dataset.json").write_text(json.dumps(meta))


def _simple_3d(root: Path) -> None:
    """Two volumes (16, 16, 12): label 1 on slices 3..6 (axis 2), 2 volumes -> 8 non-empty
    slices."""
    for i in range(2):
        label = np.zeros((16, 16, 12), np.uint8)
        label[4:10, 5:11, 3:7] = 1
        _nifti(
            root / "images" / f"vol{i}.nii.gz", RNG.integers(0, 200, (16, 16, 12)).astype(np.int16)
        )
        _nifti(root / "labels" / f"vol{i}.nii.gz", label)


def _nnunet(root: Path, channels: int = 2) -> None:
    for name in ("liver_001", "liver_002"):
        for c in range(channels):
            _nifti(
                root / "imagesTr" / f"{name}_{c:04d}.nii.gz",
                RNG.random((12, 12, 6)).astype(np.float32),
            )
        label = np.zeros((12, 12, 6), np.uint8)
        label[2:8, 2:8, 1:5] = 1
        _nifti(root / "labelsTr" / f"{name}.nii.gz", label)
    meta = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "liver": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "Dataset001_Liver",
    }
    (root / "dataset.json").write_text(json.dumps(meta))


def test_nnunet_layout(tmp_path: Path) -> None:
    _nnunet(tmp_path)
    info = open_dataset(tmp_path)
    assert info.layout == "nnunet" and info.name == "Dataset001_Liver"
    assert info.labels == {1: "liver"} and info.modality == "MR0, MR1"
    assert [case.name for case in info.cases] == ["liver_001", "liver_002"]
    assert [Path(p).name for p in info.cases[0].image_paths] == [
        "liver_001_0000.nii.gz",
        "liver_001_0001.nii.gz",
    ]
    assert Path(info.cases[1].label_path).name == "liver_002.nii.gz"


def test_nnunet_missing_channel_is_reported(tmp_path: Path) -> None:
    _nnunet(tmp_path)
    (tmp_path / "imagesTr" / "liver_002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="case 'liver_002' has channels \\[0\\], expected 0..1"):
        open_dataset(tmp_path)


def test_simple_layout_with_value_to_name_labels(tmp_path: Path) -> None:
    _simple_2d(tmp_path)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "disc", "2": "corner"}})
    )
    (tmp_path / "images" / ".DS_Store").write_bytes(b"junk")
    info = open_dataset(tmp_path)
    assert info.layout == "simple" and info.name == tmp_path.name and info.modality == "unknown"
    assert info.labels == {1: "disc", 2: "corner"}
    assert [(c.name, Path(c.image_paths[0]).suffix) for c in info.cases] == [
        ("case0", ".png"),
        ("case1", ".jpg"),
        ("case2", ".png"),
    ]


def test_simple_layout_without_dataset_json_and_unlabelled_case(tmp_path: Path) -> None:
    _simple_2d(tmp_path)
    (tmp_path / "dataset.json").unlink()
    (tmp_path / "labels" / "case2.png").unlink()
    info = open_dataset(tmp_path)
    assert info.labels == {} and info.cases[2].label_path is None


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda root: _png(root / "labels" / "ghost.png", np.zeros((4, 4), np.uint8)),
            "label without image: labels/ghost.png",
        ),
        (
            lambda root: _png(root / "images" / "case0.bmp", np.zeros((4, 4), np.uint8)),
            "two files for case 'case0'",
        ),
        (lambda root: (root / "dataset.json").write_text("{not json"), "unreadable dataset.json"),
        (
            lambda root: (root / "dataset.json").write_text('{"labels": {"a": "b"}}'),
            "neither name -> value",
        ),
    ],
)
def test_bad_simple_layouts(tmp_path: Path, damage, problem: str) -> None:
    _simple_2d(tmp_path)
    damage(tmp_path)
    with pytest.raises(InputError, match=problem):
        open_dataset(tmp_path)


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a dataset folder"):
        open_dataset(tmp_path)
    with pytest.raises(InputError, match="dataset folder not found"):
        open_dataset(tmp_path / "absent")
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="no images found in images/"):
        open_dataset(tmp_path)


def test_load_examples_2d(tmp_path: Path) -> None:
    _simple_2d(tmp_path)
    images, labels, case_ids = load_examples(open_dataset(tmp_path), resolution=20)
    assert images.shape == (3, 3, 20, 20) and images.dtype == np.uint8
    assert labels.shape == (3, 20, 20) and labels.dtype == np.uint8
    assert case_ids.tolist() == ["case0", "case1", "case2"]
    assert set(np.unique(labels[0])) == {0, 1, 2} and images.max() > 200


def test_load_examples_3d_keeps_nonempty_and_some_empty_slices(tmp_path: Path) -> None:
    _simple_3d(tmp_path)
    info = open_dataset(tmp_path)
    images, labels, case_ids = load_examples(info, resolution=8, max_empty_fraction=0.25)
    # per volume: 4 non-empty slices + floor(0.25 * 8 empty) = 2 empty slices
    assert images.shape == (12, 3, 8, 8) and labels.shape == (12, 8, 8)
    assert (labels.reshape(12, -1).max(axis=1) > 0).sum() == 8
    assert case_ids.tolist() == ["vol0"] * 6 + ["vol1"] * 6
    sagittal, _, _ = load_examples(info, resolution=8, axis=0, max_empty_fraction=0.0)
    assert len(sagittal) == 2 * 6


def test_build_tasks_on_a_mixed_tiny_collection(tmp_path: Path) -> None:
    _simple_2d(tmp_path / "toy2d")
    _simple_3d(tmp_path / "toy3d")
    _nnunet(tmp_path / "liver", channels=3)
    tasks = build_tasks([tmp_path], resolution=16, min_examples=2)
    assert [task.name for task in tasks] == [
        "Dataset001_Liver/liver",
        "toy2d/disc",
        "toy3d/label_1",
    ]
    by_name = {task.name: task for task in tasks}
    assert len(by_name["toy2d/disc"]) == 3 and len(by_name["toy3d/label_1"].nonempty()) == 8
    assert by_name["toy2d/disc"].group == "toy2d" and by_name["toy2d/disc"].masks.dtype == bool
    # the corner label of toy2d has one example only; with min_examples=1 it becomes a task sharing
    # images
    tasks = build_tasks([tmp_path / "toy2d"], resolution=16, min_examples=1)
    assert [task.name for task in tasks] == ["toy2d/disc", "toy2d/corner"]
    assert tasks[0].images is tasks[1].images and tasks[1].nonempty().tolist() == [0]


def test_label_shape_mismatch_is_reported(tmp_path: Path) -> None:
    _simple_2d(tmp_path)
    _png(tmp_path / "labels" / "case1.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(
        InputError, match="case1.png: label shape \\(10, 10\\) does not match image shape"
    ):
        load_examples(open_dataset(tmp_path), resolution=16)


def test_build_tasks_from_real_datasets(shared_data: Path) -> None:
    tasks = build_tasks([shared_data / "ph2", shared_data / "la_mri"], resolution=32, max_cases=3)
    assert [task.name for task in tasks] == ["ph2/lesion", "la_mri/left_atrium"]
    ph2, la = tasks
    assert ph2.images.shape == (3, 3, 32, 32) and len(ph2.nonempty()) == 3
    assert la.images.shape[1:] == (3, 32, 32) and len(la) > 3 and len(np.unique(la.case_ids)) == 3
    for task in tasks:
        assert (
            task.images.dtype == np.uint8
            and task.masks.dtype == bool
            and task.masks.shape[1:] == (32, 32)
        )
        image, mask = task.example(0)
        assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
