"""Annotated volumes as prompts (issue 18 item 1): slice choice, orientation through the affines,
one-line errors naming the file, Segmenter.encode_volume_prompts, `segment --prompt-volume` and the
batch jobs' prompt_volume."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_checkpoint, write_nifti  # noqa: F401 (fixture)
from PIL import Image

from promptseg.cli import main
from promptseg.data.io import read_image
from promptseg.data.synthetic import phantom_volume
from promptseg.engine.batch import PromptSpec, encode
from promptseg.engine.segmenter import Segmenter
from promptseg.engine.volume_prompts import choose_slices, volume_prompts, volume_slices
from promptseg.errors import InputError

SWAPPED = np.array(
    [[0.0, -1.5, 0.0, 40.0], [1.2, 0.0, 0.0, -8.0], [0.0, 0.0, 2.0, 3.0], [0, 0, 0, 1.0]]
)
# the affine of `reordered(v)` when v is stored RAS: stored voxel (a, b, k) is v[b, n - 1 - a, k]
REORDERED = np.array(
    [[0.0, 1.5, 0.0, 0.0], [-1.2, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1.0]]
)


def reordered(array: np.ndarray) -> np.ndarray:
    """`array` (stored RAS) in another voxel order: two axes swapped, the new first one flipped."""
    return np.ascontiguousarray(np.flip(np.swapaxes(array, 0, 1), 0))


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A (24, 32, 32) phantom (organ on the middle slices of axis 0) as (X, Y, Z) = (32, 32, 24)."""
    volume, labels = phantom_volume(np.random.default_rng(3), (24, 32, 32))
    return np.moveaxis(volume, 0, 2).copy(), np.moveaxis(labels, 0, 2).copy()


def test_choose_slices_spreads_over_the_extent_and_adds_slices_just_outside() -> None:
    wanted = np.zeros(40, dtype=bool)
    wanted[10:30] = True
    chosen = choose_slices(wanted, slices=8, empty=2)
    inside, outside = chosen[wanted[chosen]], chosen[~wanted[chosen]]
    assert len(inside) == 6 and len(outside) == 2
    assert inside.min() > 10 and inside.max() < 29  # the near-empty tips are avoided
    assert outside.min() < 10 and outside.max() > 29  # one below, one above
    assert np.all(np.abs(outside - np.array([10, 29])) <= 3)  # just outside, not far away


def test_choose_slices_with_the_label_everywhere_takes_none_outside() -> None:
    assert len(choose_slices(np.ones(10, dtype=bool), slices=4, empty=1)) == 4


def test_slices_are_the_same_whatever_the_storage_order(tmp_path: Path, phantom) -> None:
    volume, labels = phantom
    write_nifti(tmp_path / "ras.nii.gz", volume.astype(np.float32))
    write_nifti(tmp_path / "ras_labels.nii.gz", labels)
    stored, stored_labels = reordered(volume), reordered(labels)
    write_nifti(tmp_path / "other.nii.gz", stored.astype(np.float32), REORDERED)
    write_nifti(tmp_path / "other_labels.nii.gz", stored_labels, REORDERED)
    plain = volume_slices(
        tmp_path / "ras.nii.gz", tmp_path / "ras_labels.nii.gz", label=1, slices=4
    )
    other = volume_slices(
        tmp_path / "other.nii.gz", tmp_path / "other_labels.nii.gz", label=1, slices=4
    )
    np.testing.assert_array_equal(plain.indices, other.indices)
    np.testing.assert_array_equal(plain.labels, other.labels)
    np.testing.assert_allclose(plain.images, other.images)
    assert (plain.labels == 1).any(axis=(1, 2)).sum() == 3  # K // 4 = 1 slice without the organ


def test_a_volume_without_the_label_or_of_another_shape_is_one_line_naming_the_file(
    tmp_path: Path, phantom
) -> None:
    volume, labels = phantom
    image = write_nifti(tmp_path / "v.nii.gz", volume.astype(np.float32))
    good = write_nifti(tmp_path / "v_labels.nii.gz", labels)
    short = write_nifti(tmp_path / "short_labels.nii.gz", labels[:, :, :-1])
    with pytest.raises(
        InputError,
        match=r"v_labels\.nii\.gz: the prompt volume holds no label 7 \(labels present: \[1, 2\]\)",
    ):
        volume_slices(image, good, label=7)
    with pytest.raises(
        InputError,
        match=r"short_labels\.nii\.gz: prompt labels of shape \(32, 32, 23\) do not match",
    ):
        volume_slices(image, short, label=1)
    empty = write_nifti(tmp_path / "empty_labels.nii.gz", np.zeros_like(labels))
    with pytest.raises(InputError, match="empty_labels.nii.gz: the prompt volume holds no label"):
        volume_slices(image, empty)


def test_several_prompt_volumes_mix_and_several_labels_keep_label_maps(phantom) -> None:
    volume, labels = phantom
    mixed = volume_prompts([volume, volume[::-1]], [labels, labels[::-1]], label=1, slices=3)
    assert len(mixed) == 6 and all(set(np.unique(p.mask)) <= {0, 1} for p in mixed)
    maps = volume_prompts(volume, labels, label=[1, 2], slices=4)
    assert any(2 in np.unique(p.mask) for p in maps)


def test_encode_volume_prompts_then_segment_a_query_of_another_orientation(
    tmp_path: Path, tiny_checkpoint: Path, phantom
) -> None:
    volume, labels = phantom
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    prompts = segmenter.encode_volume_prompts(volume, labels, label=1, slices=5, axis=2)
    assert prompts.num_prompts == 5
    query = write_nifti(
        tmp_path / "q.nii.gz", reordered(volume)[:, :20].astype(np.float32), REORDERED
    )
    result = segmenter.segment_volume(str(query), prompts, axis=2)
    assert result.probabilities.shape == (32, 20, 24)  # the query's own grid


def test_segment_cli_with_a_prompt_volume_writes_the_query_grid(
    tmp_path: Path, tiny_checkpoint: Path, phantom, capsys
) -> None:
    volume, labels = phantom
    image = write_nifti(tmp_path / "atlas.nii.gz", volume.astype(np.float32))
    label_file = write_nifti(tmp_path / "atlas_labels.nii.gz", labels)
    query = write_nifti(
        tmp_path / "scan.nii.gz", volume[:, :, 2:].astype(np.float32), SWAPPED, b"query header"
    )
    out = tmp_path / "out"
    common = [
        "segment",
        "--prompt-volume",
        image,
        label_file,
        "--prompt-slices",
        "4",
        "--query",
        query,
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([str(a) for a in common + ["--label", "2", "--out", out]]) == 0
    written = nib.load(out / "scan_mask.nii.gz")
    assert written.shape == (32, 32, 22)
    np.testing.assert_allclose(written.affine, SWAPPED)
    assert written.header["descrip"].tobytes().rstrip(b"\0") == b"query header"
    assert main([str(a) for a in common + ["--label", "5", "--out", tmp_path / "bad"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "atlas_labels.nii.gz: the prompt volume holds no label 5" in err[0]
    assert not (tmp_path / "bad").exists()


def test_batch_prompt_volume_takes_the_same_slices(
    tiny_checkpoint: Path, tmp_path: Path, phantom
) -> None:
    volume, labels = phantom
    image = write_nifti(tmp_path / "atlas.nii.gz", volume.astype(np.float32))
    label_file = write_nifti(tmp_path / "atlas_labels.nii.gz", labels)
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    encoded = encode(
        segmenter, PromptSpec(volume=(str(image), str(label_file)), labels=(2,), slices=4)
    )
    direct = segmenter.encode_volume_prompts(image, label_file, label=2, slices=4)
    assert encoded[2].key == direct.key  # one owner of the slice choice: the same prompt set


def test_segment_cli_planes(tmp_path: Path, tiny_checkpoint: Path, phantom, capsys):
    volume, labels = phantom
    image = write_nifti(tmp_path / "atlas.nii.gz", volume.astype(np.float32))
    label_file = write_nifti(tmp_path / "atlas_labels.nii.gz", labels)
    query = write_nifti(
        tmp_path / "scan.nii.gz", reordered(volume)[:, :, 3:].astype(np.float32), REORDERED
    )
    common = [
        "segment",
        "--prompt-volume",
        image,
        label_file,
        "--prompt-slices",
        "3",
        "--label",
        "1",
        "--checkpoint",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--no-progress",
        "--planes",
    ]
    assert (
        main(
            [
                str(a)
                for a in common
                + ["--query", query, "--out", tmp_path / "out", "--slice-consistency"]
            ]
        )
        == 0
    )
    assert nib.load(tmp_path / "out" / "scan_mask.nii.gz").shape == (32, 32, 21)
    assert (
        main(
            [
                str(a)
                for a in common + ["--query", query, "--out", tmp_path / "e", "--ensemble", "2"]
            ]
        )
        == 2
    )
    assert "--planes: does not combine with --ensemble" in capsys.readouterr().err
    png = tmp_path / "q.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    assert main([str(a) for a in common + ["--query", png, "--out", tmp_path / "f"]]) == 2
    assert "q.png: --planes segments volumes" in capsys.readouterr().err


def test_a_dicom_series_folder_is_a_prompt_volume(tmp_path: Path, phantom) -> None:
    from dicom_helpers import write_series

    volume, labels = phantom
    stored = np.round(volume * 1000).astype(np.int16)
    write_series(tmp_path / "series", stored, orientation=(1, 0, 0, 0, 1, 0), rescale=(1.0, 0.0))
    geometry = read_image(tmp_path / "series").affine
    label_file = write_nifti(tmp_path / "series_labels.nii.gz", labels, geometry)
    image_file = write_nifti(tmp_path / "same.nii.gz", stored.astype(np.float32), geometry)
    from_dicom = volume_slices(tmp_path / "series", label_file, label=1, slices=4)
    from_nifti = volume_slices(image_file, label_file, label=1, slices=4)
    np.testing.assert_array_equal(from_dicom.indices, from_nifti.indices)
    np.testing.assert_allclose(from_dicom.images, from_nifti.images)
