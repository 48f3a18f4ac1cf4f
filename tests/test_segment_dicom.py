"""`promptseg segment` and `promptseg batch` on DICOM queries: --series (and the jobs' "series" key)
chooses one series of a folder of several, and a DICOM query gets a DICOM-SEG (BINARY, FRACTIONAL
with --save-probabilities) that highdicom reads back with the source series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, write_png

pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from dicom_helpers import write_series

from promptseg.cli import main
from promptseg.data.dicom import read_dicom
from promptseg.model import PromptSegNet
from promptseg.model.weights import save_weights

CHOSEN, OTHER = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a random-initialised helpers.TINY_CONFIG model (seed 0)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(PromptSegNet(TINY_CONFIG), path)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/labelsTr with two prompt PNGs and label maps, ROOT/dataset.json naming label 1, and
    ROOT/mixed/: two CT series (CHOSEN, OTHER) of 4 oblique slices of 24 x 20 in one folder."""
    root = tmp_path_factory.mktemp("dicom_segment")
    rng = np.random.default_rng(3)
    (root / "labelsTr").mkdir()
    for n in range(2):
        image, mask = disk_example(rng, (40, 48))
        write_png(root / "labelsTr" / f"p{n}.png", image)
        write_png(root / "labelsTr" / f"p{n}_mask.png", mask)
    (root / "dataset.json").write_text(
        json.dumps({"name": "t", "labels": {"background": 0, "liver lesion": 1}})
    )
    for uid, seed in ((CHOSEN, 0), (OTHER, 1)):
        volume = (
            np.stack([disk_example(rng, (20, 24))[0].T for _ in range(4)], axis=-1).astype(np.int16)
            * 4
        )
        write_series(root / "mixed", volume, rescale=(0.25, 0.0), series_uid=uid, seed=seed)
    return root


def segment_args(case: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    args = [
        "segment",
        "--query",
        str(case / "mixed"),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]
    for n in range(2):
        args += [
            "--prompt",
            str(case / "labelsTr" / f"p{n}.png"),
            str(case / "labelsTr" / f"p{n}_mask.png"),
        ]
    return args


def source_uids(folder: Path, series: str) -> list[str]:
    """SOPInstanceUIDs of `series` in `folder` in slice order (as read_dicom sorts them)."""
    return [str(ds.SOPInstanceUID) for ds in read_dicom(folder, series=series).dicom.datasets]


def test_several_series_refused_without_series(
    case: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(segment_args(case, tmp_path / "out", checkpoint)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"promptseg: error: {case / 'mixed'}: holds 2 series"
    )
    assert CHOSEN in err[0] and OTHER in err[0] and "--series UID" in err[0]
    assert main(segment_args(case, tmp_path / "out", checkpoint, "--series", "1.2.3.4")) == 2
    assert (
        capsys.readouterr().err
        == "promptseg: error: --series: no DICOM input holds series 1.2.3.4\n"
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_segment_writes_a_dicom_seg_of_the_chosen_series(
    case: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(segment_args(case, out, checkpoint, "--series", CHOSEN, "--save-probabilities")) == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "mixed_mask.nii.gz",
        "mixed_prob.nii.gz",
        "mixed_prob_seg.dcm",
        "mixed_seg.dcm",
    ]
    mask = np.asarray(nib.load(out / "mixed_mask.nii.gz").dataobj)
    series = read_dicom(case / "mixed", series=CHOSEN)
    np.testing.assert_allclose(nib.load(out / "mixed_mask.nii.gz").affine, series.affine, atol=1e-5)
    seg = hd.seg.segread(out / "mixed_seg.dcm")
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "liver lesion"
    ]  # from ROOT/dataset.json
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == CHOSEN
    assert seg.StudyInstanceUID == series.dicom.datasets[0].StudyInstanceUID
    uids = source_uids(case / "mixed", CHOSEN)
    frames = seg.get_pixels_by_source_instance(
        uids, combine_segments=True
    )  # (slices, rows, columns)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), mask)
    fractional = hd.seg.segread(out / "mixed_prob_seg.dcm")
    assert fractional.SegmentationType == "FRACTIONAL"
    stored = fractional.get_pixels_by_source_instance(uids, combine_segments=False)[..., 0]
    probabilities = np.asarray(nib.load(out / "mixed_prob.nii.gz").dataobj)
    np.testing.assert_allclose(stored.transpose(2, 1, 0), probabilities, atol=1 / 255 + 1e-6)
    # Another series of the same folder, names from --label-names (over dataset.json).
    assert (
        main(
            segment_args(
                case, tmp_path / "other", checkpoint, "--series", OTHER, "--label-names", "1=tumour"
            )
        )
        == 0
    )
    other = hd.seg.segread(tmp_path / "other" / "mixed_seg.dcm")
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == OTHER
    assert [s.SegmentLabel for s in other.SegmentSequence] == ["tumour"]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [
        "mixed_mask.nii.gz",
        "mixed_seg.dcm",
    ]


def test_segment_outputs_are_all_or_nothing(
    case: Path,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import promptseg.cli.segment as segment_command
    from promptseg.errors import InputError

    def failing(*args: object, **kwargs: object) -> dict:
        def write(temporary: str) -> None:
            Path(temporary).write_bytes(b"partial")
            raise InputError("mixed_seg.dcm", "disk full")

        return {"seg": write}

    monkeypatch.setattr(segment_command, "segmentation_writers", failing)
    out = tmp_path / "out"
    assert main(segment_args(case, out, checkpoint, "--series", CHOSEN)) == 2
    assert "disk full" in capsys.readouterr().err
    assert [
        p.name for p in out.iterdir() if not p.name.startswith(".")
    ] == []  # no mask without its SEG
    monkeypatch.undo()
    assert main(segment_args(case, out, checkpoint, "--series", CHOSEN)) == 0
    assert main(segment_args(case, out, checkpoint, "--series", CHOSEN)) == 2  # outputs kept
    assert "output exists; pass --overwrite" in capsys.readouterr().err


def test_batch_jobs_choose_a_series(
    case: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [
        [str(case / "labelsTr" / f"p{n}.png"), str(case / "labelsTr" / f"p{n}_mask.png")]
        for n in range(2)
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps(job) + "\n"
            for job in [
                {
                    "query": str(case / "mixed"),
                    "series": CHOSEN,
                    "prompts": prompts,
                    "out": "chosen",
                },
                {"query": str(case / "mixed"), "prompts": prompts, "out": "unchosen"},
            ]
        )
    )
    args = [
        "batch",
        str(jobs),
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 1  # the job without a series fails, naming the series; the other is done
    err = capsys.readouterr().err
    assert "job unchosen failed:" in err and f"{case / 'mixed'}: holds 2 series" in err
    seg = hd.seg.segread(tmp_path / "out" / "chosen_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == CHOSEN
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver lesion"]
    single = tmp_path / "single"
    assert main(segment_args(case, single, checkpoint, "--series", CHOSEN)) == 0
    np.testing.assert_array_equal(
        np.asarray(nib.load(single / "mixed_mask.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "out" / "chosen_mask.nii.gz").dataobj),
    )
    png = tmp_path / "png.jsonl"
    png.write_text(
        json.dumps({"query": prompts[0][0], "series": CHOSEN, "prompts": prompts}) + "\n"
    )
    assert main(["batch", str(png), *args[2:]]) == 2
    assert capsys.readouterr().err == (
        f"promptseg: error: {png}:1: 'series' chooses a DICOM series, but "
        f"{prompts[0][0]} is not a DICOM input\n"
    )


def test_batch_prompt_volume_series(
    case: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = read_dicom(case / "mixed", series=OTHER)
    labels = tmp_path / "other_labels.nii.gz"
    nib.save(nib.Nifti1Image((other.array > 100).astype(np.uint8), other.affine), labels)
    jobs = tmp_path / "jobs.jsonl"
    job = {
        "query": str(case / "mixed"),
        "series": CHOSEN,
        "prompt_volume": [str(case / "mixed"), str(labels)],
        "prompt_series": OTHER,
    }
    jobs.write_text(json.dumps(job) + "\n")
    args = [
        "batch",
        str(jobs),
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        "--prompt-slices",
        "2",
    ]
    assert main(args) == 0
    assert (tmp_path / "out" / "mixed_seg.dcm").is_file()
    del job["prompt_series"]
    jobs.write_text(json.dumps(job) + "\n")
    assert (
        main([*args[:3], str(tmp_path / "again"), *args[4:]]) == 1
    )  # the prompt volume's folder is ambiguous
    assert f"prompts: {case / 'mixed'}: holds 2 series" in capsys.readouterr().err
    bad = {
        "query": str(case / "mixed"),
        "prompts": [["a.png", "a_mask.png"]],
        "prompt_series": OTHER,
    }
    jobs.write_text(json.dumps(bad) + "\n")
    assert main(args) == 2
    assert (
        capsys.readouterr().err
        == f"promptseg: error: {jobs}:1: 'prompt_series' applies to a 'prompt_volume' only\n"
    )
