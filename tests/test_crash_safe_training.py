"""Crash-safe training (issue 6): a run killed with SIGKILL part-way resumes onto the uninterrupted
trajectory, and a checkpoint write cut off part-way never damages the previous checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import promptseg.train.checkpoint as checkpoint
import promptseg.train.trainer as trainer_module
from promptseg.cli import main
from promptseg.torch_threads import single_torch_thread
from promptseg.train.checkpoint import load_run_model
from promptseg.train.config import TrainConfig
from promptseg.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig.load(REPO / "configs" / "tiny_test.yaml")
STEPS, CHECKPOINT_EVERY, KILLED_AFTER = 10, 4, 6

# Runs `promptseg train` (argv after the script) and, once step KILLED_AFTER is logged, prints
# "paused"
# and blocks, so that the test kills it at a known step: after the step-4 checkpoint, before step
# 8's.
PAUSING_TRAIN = f"""
import sys
from promptseg.cli import main
from promptseg.train.trainer import Trainer
log = Trainer.log
def log_then_pause(self, record):
    log(self, record)
    if record["step"] == {KILLED_AFTER}:
        print("paused", flush=True)
        sys.stdin.read()
Trainer.log = log_then_pause
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train in this process on one thread, like the OMP_NUM_THREADS=1 subprocesses (same
    arithmetic)."""
    with single_torch_thread():
        yield


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"log.jsonl of {run} repeats or reorders steps: {steps}"
    return {r["step"]: r["loss"] for r in records}


def train_argv(config: Path, out: Path) -> list[str]:
    return ["train", "--config", str(config), "--out", str(out), "--device", "cpu", "--no-progress"]


def test_sigkilled_run_resumes_onto_the_uninterrupted_trajectory(
    tmp_path: Path, one_thread: None
) -> None:
    """SIGKILL after step 6 (checkpoint at 4); --resume gives the losses of steps 5..10 and the
    final weights of an uninterrupted run exactly, and one log with each step once."""
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({**TINY.to_dict(), "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY})
    )
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAIN, *train_argv(config, killed)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert (
            main(train_argv(config, straight)) == 0
        )  # the uninterrupted run, while the child trains
        waiting = selectors.DefaultSelector()
        waiting.register(child.stdout, selectors.EVENT_READ)
        assert waiting.select(timeout=300), "the training subprocess printed nothing"
        started = (
            child.stdout.readline()
        )  # where the run goes (stderr is read only once the child ends)
        assert started.startswith("training to step"), started
        assert child.stdout.readline() == "paused\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert json.loads((killed / "latest.json").read_text())["step"] == 4
    assert not (killed / "final.safetensors").exists() and max(losses(killed)) == KILLED_AFTER

    assert main([*train_argv(config, killed), "--resume"]) == 0
    resumed, expected = losses(killed), losses(straight)
    assert list(resumed) == list(range(1, STEPS + 1))
    assert resumed == expected  # bit-identical on CPU: same episodes per step, same optimizer state
    final, reference = (
        load_file(str(killed / "final.safetensors")),
        load_file(str(straight / "final.safetensors")),
    )
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)


CUT_POINTS = {
    # what fails while step 4's checkpoint is written, and how
    "weights file, half written": ("save_file", OSError("No space left on device")),
    "step metadata": ("step-4.json", KeyboardInterrupt()),
    "latest.json pointer": ("latest.json", OSError("No space left on device")),
}


@pytest.mark.parametrize("cut", list(CUT_POINTS))
def test_cut_off_checkpoint_write_keeps_the_previous_checkpoint(
    cut: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """A checkpoint write failing part-way (disk full, Ctrl-C) leaves latest.json on the previous,
    intact checkpoint, no temporary files, and a run that resumes from that step with a log trimmed
    to it."""
    where, failure = CUT_POINTS[cut]
    saved: dict[int, dict[str, torch.Tensor]] = {}
    save_checkpoint, save_file, write_json = (
        checkpoint.save_training_checkpoint,
        checkpoint.save_file,
        checkpoint.write_json_unchecked,
    )

    def recording_save(run_dir, step, model, optimizer, info, keep=3):
        saved[step] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return save_checkpoint(run_dir, step, model, optimizer, info, keep)

    def failing_save_file(tensors, filename, metadata=None):
        if where == "save_file" and "step-4" in os.path.basename(filename):
            save_file(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(
                Path(filename).read_bytes()[: os.path.getsize(filename) // 2]
            )
            raise failure
        save_file(tensors, filename, metadata=metadata)

    def failing_write_json(path, data):
        if path.name == where and (where != "latest.json" or data["step"] == 4):
            raise failure
        write_json(path, data)

    monkeypatch.setattr(trainer_module, "save_training_checkpoint", recording_save)
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    monkeypatch.setattr(checkpoint, "write_json_unchecked", failing_write_json)
    config = dataclasses.replace(TINY, steps=4, checkpoint_every=2)
    with pytest.raises(type(failure)):
        Trainer(config, [], tmp_path, progress=False).run()

    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "temporary files left behind"
    )
    restored = load_run_model(tmp_path).state_dict()
    assert all(torch.equal(restored[name], saved[2][name]) for name in saved[2])
    monkeypatch.undo()
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # a record cut off by the crash
    resumed = Trainer(config, [], tmp_path, progress=False)
    assert resumed.resume() and resumed.step == 2
    assert list(losses(tmp_path)) == [
        1,
        2,
    ]  # records after the restored step are dropped, the cut one too
