"""Batch jobs with three-plane segmentation and slice consistency (issue 18): the job keys 'planes'
and 'slice_consistency', the `batch --planes/--slice-consistency` defaults, their checks, and the
same masks as the API."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint, write_nifti, write_png  # noqa: F401 (fixture)

from promptseg.cli import main
from promptseg.data.synthetic import phantom_volume
from promptseg.engine.batch import Options, read_jobs
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import InputError


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """A phantom atlas with labels, a phantom scan with its truth, and a 2D prompt and query."""
    volume, labels = phantom_volume(np.random.default_rng(3), (24, 32, 32))
    volume, labels = np.moveaxis(volume, 0, 2).copy(), np.moveaxis(labels, 0, 2).copy()
    write_nifti(tmp_path / "atlas.nii.gz", volume.astype(np.float32))
    write_nifti(tmp_path / "atlas_labels.nii.gz", labels)
    scan, truth = phantom_volume(np.random.default_rng(4), (20, 32, 32))
    write_nifti(tmp_path / "scan.nii.gz", np.moveaxis(scan, 0, 2).astype(np.float32))
    write_nifti(tmp_path / "scan_truth.nii.gz", np.moveaxis(truth, 0, 2).astype(np.uint8))
    image, mask = disk_example(np.random.default_rng(1), (40, 48))
    write_png(tmp_path / "p.png", image)
    write_png(tmp_path / "p_mask.png", mask * 255)
    write_png(tmp_path / "q.png", image)
    return tmp_path


VOLUME_JOB = {
    "query": "scan.nii.gz",
    "prompt_volume": ["atlas.nii.gz", "atlas_labels.nii.gz"],
    "label": 1,
    "truth": "scan_truth.nii.gz",
}
FLAT_JOB = {"query": "q.png", "prompts": [["p.png", "p_mask.png"]]}


def jobs_file(folder: Path, *jobs: dict) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({**VOLUME_JOB, "planes": "yes"}, "'planes' must be true or false"),
        ({**VOLUME_JOB, "slice_consistency": 1}, "'slice_consistency' must be true or false"),
        ({**FLAT_JOB, "planes": True}, "'planes' applies to volume queries"),
        ({**FLAT_JOB, "slice_consistency": True}, "'slice_consistency' applies to volume queries"),
        (
            {"query": "scan.nii.gz", "prompts": [["p.png", "p_mask.png"]], "planes": True},
            "'planes' needs a 'prompt_volume'",
        ),
    ],
)
def test_bad_flags_are_one_line_naming_the_line(files: Path, job: dict, message: str) -> None:
    path = jobs_file(files, FLAT_JOB, job)
    with pytest.raises(InputError, match=f"jobs.jsonl:2: {message}"):
        read_jobs(str(path), str(files / "out"), Options())


def test_cli_defaults_apply_where_they_can_and_lines_override(files: Path) -> None:
    path = jobs_file(
        files,
        FLAT_JOB,
        VOLUME_JOB,
        {**VOLUME_JOB, "out": "own", "planes": False, "slice_consistency": False},
        {"query": "scan.nii.gz", "prompts": [["p.png", "p_mask.png"]], "out": "pairs"},
    )
    plain = read_jobs(str(path), str(files / "out"), Options())
    both = read_jobs(str(path), str(files / "out"), Options(planes=True, slice_consistency=True))
    assert [(j.prompts.planes, j.consistency) for j in plain] == [(False, False)] * 4
    assert [(j.prompts.planes, j.consistency) for j in both] == [
        (False, False),
        (True, True),
        (False, False),
        (False, True),
    ]
    # a job the defaults leave alone keeps its digest (a resumed run does not redo it)
    assert plain[0].digest == both[0].digest and plain[2].digest == both[2].digest
    assert plain[1].digest != both[1].digest and plain[3].digest != both[3].digest


def test_batch_planes_and_consistency_give_the_api_masks(
    files: Path, tiny_checkpoint: Path
) -> None:
    path = jobs_file(files, FLAT_JOB, {**VOLUME_JOB, "slice_consistency": True})
    args = ["batch", path, "--out", files / "out", "--checkpoint", tiny_checkpoint]
    args += ["--device", "cpu", "--prompt-slices", "4", "--planes", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    planes = segmenter.encode_volume_prompts(
        str(files / "atlas.nii.gz"),
        str(files / "atlas_labels.nii.gz"),
        label=1,
        slices=4,
        axis=(0, 1, 2),
    )
    expected = segmenter.segment_volume(str(files / "scan.nii.gz"), planes, consistency=True)
    written = np.asarray(nib.load(files / "out" / "scan_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(written > 0, expected.probabilities > 0.5)
    summary = (files / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",done," in line for line in summary[1:])


def test_batch_planes_read_the_prompt_volume_once(
    files: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three axes' prompt sets are cut from one reading of the prompt volume and its labels
    (they were read once per axis)."""
    import promptseg.engine.batch as batch_module
    import promptseg.engine.volume_prompts as volume_prompts_module

    reads: list[str] = []
    read_input, read_label = batch_module.read_input, volume_prompts_module.read_label

    def counted_input(path, *args, **kwargs):
        reads.append(Path(path).name)
        return read_input(path, *args, **kwargs)

    def counted_label(path, *args, **kwargs):
        reads.append(Path(path).name)
        return read_label(path, *args, **kwargs)

    monkeypatch.setattr(batch_module, "read_input", counted_input)
    monkeypatch.setattr(volume_prompts_module, "read_label", counted_label)
    path = jobs_file(files, {**VOLUME_JOB, "planes": True})
    args = ["batch", path, "--out", files / "out", "--checkpoint", tiny_checkpoint]
    args += ["--device", "cpu", "--prompt-slices", "4", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    assert reads.count("atlas.nii.gz") == 1 and reads.count("atlas_labels.nii.gz") == 1
