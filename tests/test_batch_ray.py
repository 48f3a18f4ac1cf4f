"""`promptseg batch --engine ray`: two actors on a local Ray give the local engine's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, write_png

from promptseg.cli import main
from promptseg.engine.batch import Job, PromptSpec, Unit
from promptseg.engine.batch_ray import assign
from promptseg.model import PromptSegNet
from promptseg.model.weights import save_weights

ray = pytest.importorskip("ray")


def test_assign_keeps_prompt_sets_together() -> None:
    specs = [PromptSpec(pairs=((f"p{n}.png", f"m{n}.png"),)) for n in range(3)]
    units = [
        Unit([Job(f"j{n}", n, "q.png", specs[n % 3], None, "", ())], {f"j{n}"}) for n in range(9)
    ]
    units.append(Unit([Job("extra", 9, "q.png", specs[0], None, "", ())], {"extra"}))
    queues = assign(units, 2)
    assert sorted(len(q) for q in queues) == [4, 6]
    for queue in queues:
        for spec in {u.prompts for u in queue}:
            assert all(u in queue for u in units if u.prompts == spec)


def test_ray_engine_equals_local(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    save_weights(PromptSegNet(TINY_CONFIG), checkpoint)
    rng = np.random.default_rng(1)
    for n in range(4):
        image, mask = disk_example(rng, (40, 48))
        write_png(tmp_path / f"p{n}.png", image)
        write_png(tmp_path / f"p{n}_mask.png", mask * 255)
    for n in range(8):
        write_png(tmp_path / f"q{n}.png", disk_example(rng, (36, 44))[0])
    sets = [
        [["p0.png", "p0_mask.png"], ["p1.png", "p1_mask.png"]],
        [["p2.png", "p2_mask.png"], ["p3.png", "p3_mask.png"]],
    ]
    (tmp_path / "jobs.jsonl").write_text(
        "".join(json.dumps({"query": f"q{n}.png", "prompts": sets[n % 2]}) + "\n" for n in range(8))
    )
    common = [
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        "--max-batch",
        "2",
        "--save-probabilities",
    ]
    assert (
        main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "local"), *common])
        == 0
    )
    assert (
        main(
            [
                "batch",
                str(tmp_path / "jobs.jsonl"),
                "--out",
                str(tmp_path / "ray"),
                "--engine",
                "ray",
                "--workers",
                "2",
                *common,
            ]
        )
        == 0
    )
    names = sorted(n for n in os.listdir(tmp_path / "local") if n.startswith("q"))
    assert (
        len(names) == 16
        and sorted(n for n in os.listdir(tmp_path / "ray") if n.startswith("q")) == names
    )
    for name in names:
        if name.endswith(".png"):
            assert (tmp_path / "ray" / name).read_bytes() == (
                tmp_path / "local" / name
            ).read_bytes(), name
        else:  # the actors run one torch thread each: the same probabilities to rounding
            np.testing.assert_allclose(
                np.load(tmp_path / "ray" / name), np.load(tmp_path / "local" / name), atol=1e-5
            )
    log = (tmp_path / "ray" / "batch_log.jsonl").read_text()
    assert log.count('"done"') == 8 and log.count('"start"') == 8
