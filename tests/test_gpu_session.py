"""The GPU session (benchmarks/gpu_session.py) and its data packer (benchmarks/gpu_pack.py), on the
CPU: the dry run through every part, what comes back from a device run, stopping commands, exporting
the weights of finished and stopped runs, the subsampled packs and the GPU plan's command lines."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks import gpu_pack, gpu_session
from benchmarks.engine import bench_engine
from benchmarks.gpu import outputs, parts, plan
from benchmarks.gpu.runner import REPO, Budget, Outcome, SessionLog, run_command
from benchmarks.kernels import bench_attention
from promptseg.data.index import build_tasks
from promptseg.data.packed import find_packs, pack_dataset_name, read_pack
from promptseg.eval.evaluate import EvalReport
from promptseg.model.weights import load_model, read_training_record, read_weights
from promptseg.train.config import TrainConfig
from promptseg.train.trainer import train


def test_dry_run_runs_every_part_and_its_output_comes_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        gpu_session.main(["--dry-run", "--out", str(out)]) == 0
    )  # the default budget: every part ends by itself
    assert "| train | stopped |" in capsys.readouterr().out
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [str(p) for p in files] == sorted(
        set(outputs.OUTPUT_NAMES) - {"kernels.json"}
    )  # kernels need CUDA
    assert outputs.output_problems(out) == []
    assert all(
        (out / p).stat().st_size <= outputs.MAX_FILE_BYTES and len(p.parts) <= 3 for p in files
    )
    summary = json.loads((out / "summary.json").read_text())
    statuses = {name: part["status"] for name, part in summary["parts"].items()}
    assert statuses == {
        "tests": "ok",
        "kernels": "skipped",
        "engine": "ok",
        "train": "stopped",
        "eval": "ok",
    }
    assert summary["parts"]["tests"]["details"]["tests"] == len(plan.DRY_TESTS)
    assert summary["parts"]["train"]["details"]["steps"] >= plan.DRY_STOP_AFTER
    assert summary["parts"]["eval"]["details"]["initial"]  # the initial weights were scored too
    weights = out / outputs.WEIGHTS_NAME
    assert {t.dtype for t in load_file(str(weights)).values() if t.is_floating_point()} == {
        torch.float16
    }
    assert load_model(weights).config.resolution == 32
    assert read_training_record(weights)["runs"][-1]["steps"] >= plan.DRY_STOP_AFTER
    assert EvalReport.load(out / "eval.json").methods == ["promptseg"]
    assert "$ " in (out / outputs.LOG_NAME).read_text()


def test_output_folder_must_hold_only_session_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds other files"):
        gpu_session.prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_problems_name_what_would_not_come_back(tmp_path: Path) -> None:
    for index in range(outputs.MAX_FILES):
        (tmp_path / f"f{index}.txt").write_text("x")
    assert outputs.output_problems(tmp_path) == []
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("x")
    problems = outputs.output_problems(tmp_path)
    assert any("9 files" in p for p in problems) and any("folders down" in p for p in problems)


def test_trim_keeps_the_start_and_the_end(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"START" + b"." * 100_000 + b"END")
    assert outputs.trim_file(log, limit=10_000) and log.stat().st_size <= 10_000
    text = log.read_bytes()
    assert text.startswith(b"START") and text.endswith(b"END") and b"middle was cut" in text
    assert not outputs.trim_file(log, limit=10_000)


def test_commands_are_stopped_by_their_time_or_their_monitor(tmp_path: Path) -> None:
    log = SessionLog(tmp_path / "log", Budget(60))
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    timed = run_command(sleeper, log, timeout_s=2, env={}, grace_s=5)
    assert (
        timed.stopped and timed.returncode != 0 and timed.seconds < 10 and "started" in timed.tail
    )
    watched = run_command(
        sleeper, log, timeout_s=30, env={}, grace_s=5, monitor=lambda elapsed: elapsed > 1
    )
    assert watched.stopped and watched.seconds < 10
    done = run_command([sys.executable, "-c", "print('done')"], log, timeout_s=30, env={})
    assert not done.stopped and done.returncode == 0 and done.last_line() == "done"


def test_weights_come_from_the_final_file_or_the_newest_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig.from_dict(plan.recipe(plan.TINY_RECIPE, steps=2, checkpoint_every=1))
    run_dir = tmp_path / "run"
    train(config, [], run_dir, device="cpu", progress=False)
    assert parts.export_weights(run_dir, tmp_path / "final.safetensors") == "final.safetensors"
    (run_dir / "final.safetensors").unlink()
    assert parts.export_weights(run_dir, tmp_path / "stopped.safetensors") == "step-2.safetensors"
    assert read_training_record(tmp_path / "stopped.safetensors") == read_training_record(
        tmp_path / "final.safetensors"
    )
    assert parts.latest_step(run_dir) == 2 and parts.latest_step(tmp_path) is None


def test_packs_keep_every_dataset_and_label_within_the_limit(tmp_path: Path) -> None:
    source = tmp_path / "source"
    plan.write_disk_packs(source, 32, 3, 2)
    full = sum(gpu_pack.folder_bytes(p) for p in find_packs(source))
    budget = full // 2
    rows = gpu_pack.pack(
        gpu_pack.source_packs(source, 32, tmp_path / "cache"), tmp_path / "out", budget
    )
    assert gpu_pack.folder_bytes(tmp_path / "out") <= budget
    assert sorted(pack_dataset_name(p) for p in find_packs(tmp_path / "out")) == sorted(
        plan.DRY_PACKS
    )
    assert any(kept < total for _, kept, total in rows)
    tasks = build_tasks([tmp_path / "out"], 32)
    assert sorted(task.name for task in tasks) == sorted(
        f"{name}/{label}" for name in plan.DRY_PACKS for label in ("disk", "square")
    )
    subsampled = next(
        p
        for p in find_packs(tmp_path / "out")
        if "subsample" in json.loads((p / "packed.json").read_text())
    )
    assert read_pack(subsampled, resolution=32) is not None


def test_choose_examples_keeps_rare_labels() -> None:
    labels = np.zeros((100, 4, 4), np.uint8)
    labels[:, 0, 0] = 1
    labels[[7, 55, 93], 1, 1] = 2  # label 2 on three examples only
    chosen = gpu_pack.choose_examples(
        labels, 12
    )  # up to 12 // (2 * 2) = 3 examples reserved per label
    assert len(chosen) == 12 and len(set(chosen)) == 12 and list(chosen) == sorted(chosen)
    assert {7, 55, 93} <= set(chosen)
    assert len({7, 55, 93} & set(gpu_pack.choose_examples(labels, 8))) == 2
    assert list(gpu_pack.choose_examples(labels, 200)) == list(range(100))
    assert (
        gpu_pack.byte_cap([1, 5, 10], 100) == float("inf")
        and gpu_pack.byte_cap([1, 5, 10], 9) == 4.0
    )


def test_vendored_packages_import_from_the_site_folder(tmp_path: Path) -> None:
    gpu_pack.vendor(tmp_path / "site", gpu_pack.VENDORED)
    for name in gpu_pack.VENDORED:
        assert (tmp_path / "site" / name / "__init__.py").is_file()
        assert not any(p.name == "tests" for p in (tmp_path / "site" / name).rglob("tests"))
    env: dict[str, str] = {}
    assert (
        not gpu_session.use_site(tmp_path / "site", env) and env == {}
    )  # installed here: the site is not needed


def test_gpu_plan_commands_parse() -> None:
    gpu = plan.gpu_plan(REPO / "device_data" / "packed", None)
    assert all((REPO / test).is_file() for test in gpu.tests)
    assert all((REPO / test.split("::")[0]).is_file() for test in plan.DRY_TESTS)
    quick = bench_attention.parse_args(["--quick"])
    before_after, *runs = [bench_attention.parse_args(flags) for flags in gpu.kernel_runs]
    assert before_after.before_after and before_after.fixed_tiles
    assert before_after.providers == bench_attention.BEFORE_AFTER_PROVIDERS
    assert "fp32" in before_after.dtypes and bench_attention.shape_grid(before_after)
    assert sorted(k for run in runs for k in run.prompts) == sorted(quick.prompts)
    assert all(
        (run.nq, run.dims, run.dtypes, run.ratios)
        == (quick.nq, quick.dims, quick.dtypes, quick.ratios)
        for run in runs
    )
    for flags in gpu.engine.values():
        parsed = bench_engine.parse_args(["--device", "cuda", *flags])
        assert parsed.slices == 256 and parsed.volume_shots == 8 and 256 in parsed.resolutions
    config = TrainConfig.from_dict(gpu.train_config)
    assert config.loader_workers >= 1 and config.checkpoint_every == plan.GPU_CHECKPOINT_EVERY
    recipe = TrainConfig.load(plan.RECIPE)
    assert config == dataclasses.replace(
        recipe, loader_workers=config.loader_workers, checkpoint_every=config.checkpoint_every
    )
    assert read_weights(gpu.init)[0] == config.model_config()  # --init needs the recipe's model


def test_site_goes_on_the_path_when_its_packages_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site" / "vendored_only_here").mkdir(parents=True)
    (tmp_path / "site" / "vendored_only_here" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", list(sys.path))
    env = {"PYTHONPATH": "/elsewhere"}
    assert gpu_session.use_site(tmp_path / "site", env)
    assert env["PYTHONPATH"] == f"{tmp_path / 'site'}{os.pathsep}/elsewhere" and sys.path[0] == str(
        tmp_path / "site"
    )
    assert not gpu_session.use_site(tmp_path / "nowhere", env)


def test_kernel_runs_merge_into_one_file_and_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path of the kernels part, with each bench_attention process replaced by the results
    file it writes."""
    gpu = dataclasses.replace(plan.gpu_plan(tmp_path, None), device="cuda")
    (tmp_path / "out").mkdir()
    session = parts.Session(
        gpu, tmp_path / "out", tmp_path, Budget(540), SessionLog(tmp_path / "log", Budget(540)), {}
    )

    def fake_run(args: list[str]) -> Outcome:
        settings = bench_attention.parse_args(args[2:])
        shape = bench_attention.shape_grid(settings)[0]
        rows = [
            {
                "provider": provider,
                "label": shape.label(),
                "status": "ok",
                "fwd_ms": 1.0,
                "fwd_tflops": 2.0,
                "bwd_ms": 3.0,
                "bwd_tflops": 4.0,
                "triton_max_abs_err": 1e-3,
            }
            for provider in settings.providers
        ]
        meta = {
            "gpu": "Fake GPU",
            "capability": "9.0",
            "torch": "t",
            "triton": "x",
            "cuda": "c",
            "date": "d",
            "settings": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()
            },
        }
        settings.out_dir.mkdir(parents=True)
        (settings.out_dir / "kernels-fake-gpu.json").write_text(
            json.dumps({**meta, "results": rows})
        )
        return Outcome(0, 1.0, False, "")

    monkeypatch.setattr(
        parts.Session, "run", lambda self, args, timeout_s, **options: fake_run(args)
    )
    result = parts.run_kernels(session)
    assert (
        result.status == "ok"
        and result.note == f"{len(gpu.kernel_runs)} of {len(gpu.kernel_runs)} runs -> kernels.json"
    )
    merged = json.loads((tmp_path / "out" / "kernels.json").read_text())
    assert len(merged["results"]) == (len(gpu.kernel_runs) - 1) * len(
        bench_attention.DEFAULT_PROVIDERS
    ) + len(bench_attention.BEFORE_AFTER_PROVIDERS)
    assert "Fake GPU" in result.markdown and "1.000 ms (2)" in result.markdown
    # One table over every run's providers; a shape a provider did not run shows "-".
    assert "| triton_baseline |" in result.markdown and "| - |" in result.markdown
