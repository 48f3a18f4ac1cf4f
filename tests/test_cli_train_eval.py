"""CLI end to end for train, eval and bench on generated data (tiny configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_checkpoint, write_disk_dataset  # noqa: F401  (pytest fixture)

from promptseg.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def disk_dataset(tmp_path: Path) -> Path:
    """A simple-layout dataset of 8 noisy disks with dataset.json naming label 1."""
    return write_disk_dataset(tmp_path / "disks", 8, labels={"background": 0, "disk": 1})


def test_train_on_a_dataset_folder_then_resume(tmp_path: Path, disk_dataset: Path) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(disk_dataset),
        "--config",
        str(REPO / "configs" / "tiny_test.yaml"),
        "--out",
        str(run),
        "--steps",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert (
        main(
            args[:-4]
            + ["4", "--no-progress", "--device", "cpu", "--resume", "--val-data", str(disk_dataset)]
        )
        == 0
    )
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run / "final.safetensors").is_file()


def test_eval_writes_comparable_rows(
    tmp_path: Path, disk_dataset: Path, tiny_checkpoint: Path, capsys
) -> None:  # noqa: F811
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--data",
            str(disk_dataset),
            "--shots",
            "1",
            "2",
            "--episodes",
            "2",
            "--queries",
            "2",
            "--checkpoint",
            str(tiny_checkpoint),
            "--unet-steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"promptseg", "nearest_prompt", "finetuned_unet"}
    for method in report["methods"].values():
        assert set(method["mean_over_tasks"]) == {"1", "2"}
    assert "disks/disk" in capsys.readouterr().out


def test_bench_prints_cached_and_reencoded_times(tiny_checkpoint: Path, capsys) -> None:  # noqa: F811
    code = main(
        [
            "bench",
            "--checkpoint",
            str(tiny_checkpoint),
            "--slices",
            "4",
            "--shots",
            "2",
            "--max-batch",
            "2",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert "| cpu | 4 | 2 | 2 |" in capsys.readouterr().out


def test_train_refuses_an_unknown_held_out_dataset(
    tmp_path: Path, disk_dataset: Path, capsys
) -> None:
    code = main(
        ["train", "--data", str(disk_dataset), "--exclude", "nope", "--out", str(tmp_path / "r")]
    )
    assert code == 2
    assert "--exclude: no dataset named nope" in capsys.readouterr().err


def test_eval_merges_methods_scored_separately(
    tmp_path: Path, disk_dataset: Path, tiny_checkpoint: Path, capsys
) -> None:  # noqa: F811
    """Baselines scored once and merged give the same cells as one run of every method."""
    common = [
        "eval",
        "--data",
        str(disk_dataset),
        "--shots",
        "1",
        "--episodes",
        "2",
        "--queries",
        "2",
        "--checkpoint",
        str(tiny_checkpoint),
        "--unet-steps",
        "2",
        "--no-progress",
    ]
    assert main(common + ["--out", str(tmp_path / "all.json")]) == 0
    assert (
        main(
            common
            + [
                "--methods",
                "nearest_prompt",
                "finetuned_unet",
                "--out",
                str(tmp_path / "base.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            common
            + [
                "--methods",
                "promptseg",
                "--merge",
                str(tmp_path / "base.json"),
                "--out",
                str(tmp_path / "merged.json"),
                "--plot",
                str(tmp_path / "dice.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "dice.png").stat().st_size > 0
    full, merged = (
        json.loads((tmp_path / name).read_text())["methods"] for name in ("all.json", "merged.json")
    )
    assert list(merged) == ["promptseg", "nearest_prompt", "finetuned_unet"]
    for method in full:
        assert [row["shots"]["1"]["dice"] for row in merged[method]["tasks"]] == [
            row["shots"]["1"]["dice"] for row in full[method]["tasks"]
        ]
    capsys.readouterr()
    other_shots = [
        "eval",
        "--data",
        str(disk_dataset),
        "--shots",
        "2",
        "--episodes",
        "2",
        "--queries",
        "2",
        "--checkpoint",
        str(tiny_checkpoint),
        "--no-progress",
        "--methods",
        "promptseg",
    ]
    assert main(other_shots + ["--merge", str(tmp_path / "base.json")]) == 2
    assert "base.json: was evaluated with shots=[1], this run uses [2]" in capsys.readouterr().err


def test_train_refuses_a_folder_holding_an_earlier_run(
    tmp_path: Path, disk_dataset: Path, capsys
) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(disk_dataset),
        "--config",
        str(REPO / "configs" / "tiny_test.yaml"),
        "--out",
        str(run),
        "--steps",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    before = (run / "log.jsonl").read_text()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err and (run / "log.jsonl").read_text() == before
    assert main(args + ["--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
