"""File safety (issue 6): outputs are written atomically, existing outputs are kept unless
--overwrite, and pickle-bearing checkpoints are refused without ever being unpickled.

tests/test_cli.py already checks the "output exists" message and that --overwrite then succeeds, and
tests/test_data_io.py that atomic_write leaves nothing when its writer raises; this module adds the
byte-for-byte guarantees, failures part-way through the CLI's writes, and the pickle refusals.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import disk_example, tiny_checkpoint, write_png  # noqa: F401 (fixture)
from PIL import Image

from promptseg.cli import main
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import CheckpointError, InputError
from promptseg.files import atomic_write, write_text
from promptseg.model.weights import load_model
from promptseg.train.checkpoint import load_run_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prompt pair and two queries (PNG)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    image, mask = disk_example(rng, (40, 48))
    write_png(root / "p.png", image)
    write_png(root / "p_mask.png", mask * 255)
    for name in ("q0", "q1"):
        write_png(root / f"{name}.png", disk_example(rng, (36, 44))[0])
    return root


def segment(data: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "segment",
        "--prompt",
        str(data / "p.png"),
        str(data / "p_mask.png"),
        "--query",
        str(data / "q0.png"),
        str(data / "q1.png"),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--no-progress",
        *extra,
    ]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("promptseg: error: "), err
    return lines[0]


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` (hidden temporaries included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# --------------------------------------------------------------------------------------------------
# Existing outputs and atomic writes


def test_existing_output_is_kept_byte_for_byte_and_nothing_else_is_written(
    data: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    """One existing output of the second query refuses the whole run before any file is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "q1_mask.png").write_bytes(b"the user's own file")
    assert main(segment(data, out, tiny_checkpoint, "--save-probabilities")) == 2
    assert "q1_mask.png: output exists" in one_error_line(capsys)
    assert files_in(out) == {"q1_mask.png": b"the user's own file"}


def test_outputs_get_the_usual_file_mode(data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    """Temporary files are owner-only; the outputs renamed from them get the mode the umask
    gives."""
    umask = os.umask(0o022)
    os.umask(umask)
    assert main(segment(data, tmp_path / "out", tiny_checkpoint, "--save-probabilities")) == 0
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def half_written_save(failure: BaseException):
    """A replacement for PIL's Image.save that writes half of a real PNG, then raises `failure`."""
    save = Image.Image.save

    def failing(self: Image.Image, fp: str, *args: object, **kwargs: object) -> None:
        save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[: os.path.getsize(fp) // 2])
        raise failure

    return failing


def test_disk_full_while_overwriting_keeps_the_old_file(
    data: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--overwrite with the disk filling up mid-write: one line naming the output, the old file
    intact, no temporary file left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "q0_mask.png").write_bytes(b"previous result")
    monkeypatch.setattr(
        Image.Image, "save", half_written_save(OSError(28, "No space left on device"))
    )
    assert main(segment(data, out, tiny_checkpoint, "--overwrite")) == 2
    line = one_error_line(capsys)
    assert "q0_mask.png: cannot write output" in line and "No space left on device" in line
    assert files_in(out) == {"q0_mask.png": b"previous result"}


def test_failure_on_a_later_output_removes_the_query_files_already_written(
    data: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The probability file failing after the mask was written: neither stays (a query's outputs go
    together)."""

    def failing_save(file: str, array: np.ndarray, *args: object, **kwargs: object) -> None:
        Path(file).write_bytes(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", failing_save)
    out = tmp_path / "out"
    assert main(segment(data, out, tiny_checkpoint, "--save-probabilities")) == 2
    assert "q0_prob.npy: cannot write output" in one_error_line(capsys)
    assert files_in(out) == {}


def test_interrupt_while_writing_leaves_no_partial_file(
    data: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C in the middle of writing the first mask: exit 130 and an output folder without
    files."""
    monkeypatch.setattr(Image.Image, "save", half_written_save(KeyboardInterrupt()))
    out = tmp_path / "out"
    assert main(segment(data, out, tiny_checkpoint)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert files_in(out) == {}


def test_output_created_by_another_process_while_writing_is_kept(tmp_path: Path) -> None:
    """The existence check and the move are one step: a file appearing in between is not
    replaced."""
    target = tmp_path / "result.txt"

    def racing_writer(temporary: str) -> None:
        Path(temporary).write_text("ours")
        target.write_text("theirs")  # another process finishes first

    with pytest.raises(InputError, match="result.txt: output exists"):
        atomic_write(target, racing_writer)
    assert files_in(tmp_path) == {"result.txt": b"theirs"}
    write_text(target, "ours", overwrite=True)
    assert target.read_text() == "ours"


# --------------------------------------------------------------------------------------------------
# Pickle-bearing checkpoints


class Explosive:
    """Unpickling an Explosive creates the file `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_checkpoint(kind: str, folder: Path) -> tuple[Path, Path]:
    """(checkpoint path, marker path): a torch.save'd state dict (zip pickle) or a raw pickle, named
    .safetensors."""
    marker = folder / "pickle-ran"
    path = folder / f"{kind}.safetensors"
    state = {"encoder.stem.weight": torch.zeros(2), "payload": Explosive(marker)}
    if kind == "torch_save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    assert not marker.exists()
    return path, marker


def run_dir_pointing_at(weights: Path) -> Path:
    """A training run folder whose latest.json names `weights` as its newest checkpoint."""
    run = weights.parent / "run"
    run.mkdir()
    os.replace(weights, run / "step-2.safetensors")
    (run / "step-2.json").write_text(
        json.dumps({"step": 2, "param_groups": [], "optim_scalars": {}})
    )
    (run / "latest.json").write_text(
        json.dumps({"step": 2, "weights": "step-2.safetensors", "meta": "step-2.json"})
    )
    return run


PICKLES = ["torch_save", "raw_pickle"]


@pytest.mark.parametrize("kind", PICKLES)
@pytest.mark.parametrize("loader", [load_model, Segmenter.from_checkpoint])
def test_pickle_checkpoint_is_refused_by_the_api(kind: str, loader, tmp_path: Path) -> None:
    path, marker = pickle_checkpoint(kind, tmp_path)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint") as caught:
        loader(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()
    # the payload is live: unpickling the file does create the marker (torch.load wants a
    # non-.safetensors name)
    if kind == "torch_save":
        torch.load(shutil.copy(path, path.with_suffix(".pt")), weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", PICKLES)
def test_pickle_training_checkpoint_is_refused_by_load_run_model(kind: str, tmp_path: Path) -> None:
    path, marker = pickle_checkpoint(kind, tmp_path)
    run = run_dir_pointing_at(path)
    with pytest.raises(
        CheckpointError, match="step-2.safetensors: not a safetensors checkpoint"
    ) as caught:
        load_run_model(run)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", PICKLES)
def test_segment_checkpoint_pickle_is_one_line(
    kind: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = pickle_checkpoint(kind, tmp_path)
    out = tmp_path / "out"
    assert main(segment(data, out, path)) == 2
    assert f"{path}: not a safetensors checkpoint" in one_error_line(capsys)
    assert not marker.exists() and files_in(out) == {}


@pytest.mark.parametrize("kind", PICKLES)
def test_train_resume_from_a_pickle_is_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = pickle_checkpoint(kind, tmp_path)
    run = run_dir_pointing_at(path)
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny_test.yaml"),
            "--out",
            str(run),
            "--resume",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "step-2.safetensors: unreadable checkpoint" in one_error_line(capsys)
    assert not marker.exists()
    assert not (run / "final.safetensors").exists()


DAMAGED_POINTERS = {
    "not json": ("{half a pointer", "latest.json: unreadable checkpoint file"),
    "not an object": ("[1, 2]", "latest.json: unreadable checkpoint file"),
    "missing meta": (
        json.dumps({"step": 2, "weights": "step-2.safetensors", "meta": "step-9.json"}),
        "step-9.json: unreadable",
    ),
    "outside the run": (
        json.dumps({"step": 2, "weights": "../elsewhere.safetensors", "meta": "step-2.json"}),
        "latest.json: damaged pointer",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGED_POINTERS))
def test_train_resume_with_a_damaged_pointer_is_one_line(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A latest.json that is not JSON, names a missing file or points outside the run:
    CheckpointError, no traceback."""
    text, expected = DAMAGED_POINTERS[damage]
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-2.json").write_text(
        json.dumps({"step": 2, "param_groups": [], "optim_scalars": {}})
    )
    (run / "latest.json").write_text(text)
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny_test.yaml"),
            "--out",
            str(run),
            "--resume",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2
    assert expected in one_error_line(capsys)
    with pytest.raises(
        CheckpointError
    ) as caught:  # it reads latest.json and the weights, not the metadata
        load_run_model(run)
    assert "\n" not in str(caught.value)
