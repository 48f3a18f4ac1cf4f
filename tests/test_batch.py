"""`promptseg batch`: jobs with shared prompt sets, a bad job among good ones, resume after SIGKILL,
and DICOM queries giving a DICOM-SEG equal to the NIfTI path's mask."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, write_nifti, write_png

from promptseg.cli import main
from promptseg.engine.batch import (
    LOG_NAME,
    Options,
    local_executor,
    read_jobs,
    run_batch,
)
from promptseg.engine.segmenter import Segmenter
from promptseg.model import PromptSegNet
from promptseg.model.weights import save_weights

PROMPTS_A = [["p0.png", "p0_mask.png"], ["p1.png", "p1_mask.png"]]
PROMPTS_B = [["p2.png", "p2_mask.png"], ["p3.png", "p3_mask.png"]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a random-initialised helpers.TINY_CONFIG model (seed 0)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(PromptSegNet(TINY_CONFIG), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four prompt PNGs with masks, 2D queries q0..q11, a volume with its truth, and a corrupt
    PNG."""
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    for n in range(4):
        image, mask = disk_example(rng, (40, 48))
        write_png(root / f"p{n}.png", image)
        write_png(root / f"p{n}_mask.png", mask * 255)
    for n in range(12):
        write_png(root / f"q{n}.png", disk_example(rng, (36, 44))[0])
    volume = np.stack([disk_example(rng, (20, 24))[0] for _ in range(4)], axis=-1).astype(np.int16)
    write_nifti(root / "vol.nii.gz", volume)
    write_nifti(root / "vol_truth.nii.gz", (volume > 150).astype(np.uint8))
    (root / "bad.png").write_bytes(b"not a png")
    return root


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return {row["job"]: row for row in csv.DictReader(handle)}


def batch_args(jobs: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "batch",
        str(jobs),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_bad_job_among_good_ones(
    data: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        data / "mixed.jsonl",
        [
            {"query": "q0.png", "prompts": PROMPTS_A},
            {"query": "bad.png", "prompts": PROMPTS_A},
            {"query": "q1.png", "prompts": PROMPTS_B, "out": "second"},
            {"query": "vol.nii.gz", "prompts": PROMPTS_A, "truth": "vol_truth.nii.gz"},
        ],
    )
    assert main(batch_args(jobs, tmp_path / "out", checkpoint)) == 1
    rows = summary(tmp_path / "out")
    assert [rows[name]["status"] for name in ("q0", "bad", "second", "vol")] == [
        "done",
        "failed",
        "done",
        "done",
    ]
    assert rows["bad"]["reason"].startswith(f"{data / 'bad.png'}: unreadable or corrupt image")
    assert 0 <= float(rows["vol"]["dice"]) <= 100 and rows["q0"]["dice"] == ""
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [LOG_NAME, "summary.csv", "q0_mask.png", "second_mask.png", "vol_mask.nii.gz"]
    )
    assert "promptseg: job bad failed:" in capsys.readouterr().err
    # The same mask as `promptseg segment` with the same prompts.
    args = [
        "segment",
        "--query",
        str(data / "q0.png"),
        "--out",
        str(tmp_path / "single"),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]
    for image, mask in PROMPTS_A:
        args += ["--prompt", str(data / image), str(data / mask)]
    assert main(args) == 0
    assert (tmp_path / "single" / "q0_mask.png").read_bytes() == (
        tmp_path / "out" / "q0_mask.png"
    ).read_bytes()
    # Rerun: the done jobs are skipped (no new start records), the failed one is retried.
    before = (tmp_path / "out" / LOG_NAME).read_text().splitlines()
    assert main(batch_args(jobs, tmp_path / "out", checkpoint)) == 1
    added = [
        json.loads(line)
        for line in (tmp_path / "out" / LOG_NAME).read_text().splitlines()[len(before) :]
    ]
    assert [(r["job"], r["event"]) for r in added] == [("bad", "start"), ("bad", "failed")]


def test_prompt_sets_encoded_once(data: Path, checkpoint: Path, tmp_path: Path) -> None:
    jobs = write_jobs(
        data / "shared.jsonl",
        [{"query": f"q{n}.png", "prompts": PROMPTS_A if n % 2 else PROMPTS_B} for n in range(8)],
    )
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", max_batch=3)
    parsed = read_jobs(str(jobs), str(tmp_path / "out"), Options())
    results = run_batch(
        parsed, str(tmp_path / "out"), Options(), 3, local_executor(segmenter, Options())
    )
    assert [r.status for r in results] == ["done"] * 8
    assert segmenter.cache.misses == 2  # two prompt sets, each encoded once for its four queries


def test_each_query_is_prepared_once(
    data: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation checks a 2D query without preparing it; segmentation prepares (resizes) it once:
    here two prompt images and three queries, five resizes."""
    import promptseg.data.preprocess as preprocess

    resized: list[tuple[int, ...]] = []
    resize_image = preprocess.resize_image

    def counting_resize(image: torch.Tensor, size: object) -> torch.Tensor:
        resized.append(tuple(image.shape))
        return resize_image(image, size)

    monkeypatch.setattr(preprocess, "resize_image", counting_resize)
    jobs = write_jobs(
        data / "once.jsonl", [{"query": f"q{n}.png", "prompts": PROMPTS_A} for n in range(3)]
    )
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", max_batch=4)
    parsed = read_jobs(str(jobs), str(tmp_path / "out"), Options())
    results = run_batch(
        parsed, str(tmp_path / "out"), Options(), 3, local_executor(segmenter, Options())
    )
    assert [r.status for r in results] == ["done"] * 3
    assert len(resized) == len(PROMPTS_A) + 3


def test_bad_jobs_file_is_one_line(
    data: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = data / "broken.jsonl"
    jobs.write_text(
        json.dumps({"query": "q0.png", "prompts": PROMPTS_A}) + '\n{"query": "q1.png", "mask": 1}\n'
    )
    assert main(batch_args(jobs, tmp_path / "out", checkpoint)) == 2
    assert capsys.readouterr().err == (
        f"promptseg: error: {jobs}:2: unknown key mask (known: query, series, "
        "prompts, prompt_volume, prompt_series, label, out, truth, planes, slice_consistency)\n"
    )
    assert not (tmp_path / "out").exists()


def test_resume_after_sigkill_equals_clean_run(
    data: Path, checkpoint: Path, tmp_path: Path
) -> None:
    entries = [
        {"query": f"q{n % 12}.png", "prompts": PROMPTS_A if n % 3 else PROMPTS_B, "out": f"job{n}"}
        for n in range(24)
    ]
    jobs = write_jobs(data / "many.jsonl", entries)
    args = batch_args(
        jobs, tmp_path / "killed", checkpoint, "--max-batch", "4", "--save-probabilities"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "promptseg", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "killed" / LOG_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count('"done"') >= 4:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    finished = log.read_text().count('"done"')
    assert 4 <= finished < 24
    assert main(args) == 0
    assert (
        main(
            batch_args(
                jobs, tmp_path / "clean", checkpoint, "--max-batch", "4", "--save-probabilities"
            )
        )
        == 0
    )
    outputs = sorted(name for name in os.listdir(tmp_path / "clean") if name.startswith("job"))
    assert len(outputs) == 48
    assert sorted(n for n in os.listdir(tmp_path / "killed") if not n.startswith(".")) == sorted(
        outputs + [LOG_NAME, "summary.csv"]
    )
    for name in outputs:
        assert (tmp_path / "killed" / name).read_bytes() == (
            tmp_path / "clean" / name
        ).read_bytes(), name


def test_dicom_query_gives_dicom_seg_equal_to_nifti_path(
    data: Path, checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("highdicom")
    import highdicom as hd
    import pydicom
    from dicom_helpers import write_series

    from promptseg.data.dicom import read_dicom

    # NIfTI -> DICOM series: the same stored values and geometry, oblique, shuffled, rescaled.
    stored = np.asarray(nib.load(data / "vol.nii.gz").dataobj).astype(np.int16) * 4
    paths = write_series(tmp_path / "ct", stored, rescale=(0.25, 0.0))
    series = read_dicom(tmp_path / "ct")
    nib.save(nib.Nifti1Image(series.array, series.affine), tmp_path / "ct.nii.gz")
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {
                "query": "ct.nii.gz",
                "prompts": [[str(data / i), str(data / m)] for i, m in PROMPTS_A],
                "out": "nifti",
            },
            {
                "query": "ct",
                "prompts": [[str(data / i), str(data / m)] for i, m in PROMPTS_A],
                "out": "dicom",
            },
        ],
    )
    assert (
        main(
            batch_args(
                jobs,
                tmp_path / "out",
                checkpoint,
                "--save-probabilities",
                "--label-names",
                "1=lesion",
            )
        )
        == 0
    )
    nifti_mask = nib.load(tmp_path / "out" / "nifti_mask.nii.gz")
    mask = np.asarray(nifti_mask.dataobj)
    assert mask.any()
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "out" / "dicom_mask.nii.gz").dataobj), mask
    )
    segment = [
        "segment",
        "--query",
        str(tmp_path / "ct"),
        "--out",
        str(tmp_path / "single"),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]
    for image, prompt_mask in PROMPTS_A:
        segment += ["--prompt", str(data / image), str(data / prompt_mask)]
    assert main(segment) == 0  # `promptseg segment` takes the series folder too, with a NIfTI mask
    single = nib.load(tmp_path / "single" / "ct_mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(single.dataobj), mask)
    np.testing.assert_allclose(single.affine, series.affine, atol=1e-5)
    seg = hd.seg.segread(tmp_path / "out" / "dicom_seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    uids = [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths
    ]  # slice order
    frames = seg.get_pixels_by_source_instance(
        uids, combine_segments=True
    )  # (slices, rows, columns)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), mask)
    # Geometry: every SEG frame lies where its source slice lies, to 1e-4 mm.
    positions = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(
            p
        ).ImagePositionPatient
        for p in paths
    }
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float),
            np.asarray(positions[source], dtype=float),
            atol=1e-4,
        )
    fractional = hd.seg.segread(tmp_path / "out" / "dicom_prob_seg.dcm")
    assert fractional.SegmentationType == "FRACTIONAL"
    probabilities = np.asarray(nib.load(tmp_path / "out" / "dicom_prob.nii.gz").dataobj)
    stored_fraction = fractional.get_pixels_by_source_instance(uids, combine_segments=False)[..., 0]
    np.testing.assert_allclose(
        stored_fraction.transpose(2, 1, 0), probabilities, atol=1 / 255 + 1e-6
    )
