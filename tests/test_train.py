"""Training: the loss falls on synthetic tasks, checkpoints resume, torchrun/DDP runs with gloo."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promptseg.model.weights import load_model
from promptseg.train.checkpoint import load_run_model
from promptseg.train.config import TrainConfig
from promptseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig.load(REPO / "configs" / "tiny_test.yaml")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_tiny_training_lowers_the_loss(tmp_path: Path) -> None:
    """Plain synthetic episodes (no augmentation, mask prompts only): the loss must fall by > 10
    %."""
    config = dataclasses.replace(
        TINY,
        steps=200,
        warmup_steps=10,
        checkpoint_every=1000,
        lr=0.004,
        task_augment=False,
        image_augment=False,
        sparse_fraction=0.0,
    )
    train(config, [], tmp_path, device="cpu", progress=False)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 200
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.9 * first, (
        f"loss did not fall: first 30 steps {first:.3f}, last 30 steps {last:.3f}"
    )
    model = load_model(tmp_path / "final.safetensors")
    assert model.config == config.model_config()


def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, steps=6, checkpoint_every=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, [], straight, device="cpu", progress=False)
    train(dataclasses.replace(config, steps=3), [], resumed, device="cpu", progress=False)
    (resumed / "final.safetensors").unlink()
    trainer = Trainer(config, [], resumed, progress=False)
    assert load_run_model(resumed).config == config.model_config()
    assert trainer.resume() and trainer.step == 3
    trainer.run()
    straight_losses = [r["loss"] for r in read_log(straight)]
    resumed_losses = [r["loss"] for r in read_log(resumed)]
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-4, atol=1e-5)


def test_config_file_with_unknown_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlearning_rate: 0.1\n")
    from promptseg.errors import InputError

    with pytest.raises(InputError, match="unknown training config keys: learning_rate"):
        TrainConfig.load(bad)


def test_torchrun_two_processes_with_gloo(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "promptseg",
        "train",
        "--config",
        str(REPO / "configs" / "tiny_test.yaml"),
        "--out",
        str(tmp_path),
        "--steps",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 logs the loss averaged over both ranks
    assert (tmp_path / "final.safetensors").is_file()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
