"""The parts of a GPU session, each a few subprocesses within its share of the budget: tests, kernel
figures, engine figures, training, evaluation. Each returns a PartResult and leaves its files in
the output folder (tests.xml, kernels.json, engine.json, the weights, eval.json); scratch files
(checkpoints with optimizer state, per-backend results) stay in the scratch folder.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine.bench_engine import markdown as engine_markdown
from benchmarks.gpu.outputs import WEIGHTS_NAME, junit_summary
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.runner import Budget, Outcome, SessionLog, run_command
from benchmarks.kernels import bench_attention
from promptseg.data.packed import find_packs, pack_dataset_name
from promptseg.engine.backends import backend_availability
from promptseg.errors import CheckpointError
from promptseg.eval.evaluate import EvalReport
from promptseg.model.weights import load_model, read_training_record, save_weights
from promptseg.train.checkpoint import load_run_model
from promptseg.train.trainer import checkpoint_compute_record
from promptseg.train.training_log import read_log_records

# Fractions of --budget-s by which the parts before training end (time one leaves goes to the next),
# and the fraction kept for the evaluation; training takes what is left between.
TESTS_UNTIL, KERNELS_UNTIL, ENGINE_UNTIL, EVAL_SHARE = 0.18, 0.34, 0.56, 0.10
FINISH_S = 10.0  # kept at the end for the weights export, the summary and trimming the log
GRACE_S = 15.0  # from SIGINT to SIGKILL
MIN_PART_S = 5.0  # a part (or backend) with less time left is skipped
BACKEND_RESERVE_S = 20.0  # of the engine's time, kept for each backend still to run
PROGRESS_EVERY_S = 30.0


@dataclass
class PartResult:
    """One part's outcome: status ok, failed, stopped (its time ran out; what it had is kept) or
    skipped; a one-line note; its seconds; figures for the summary JSON; markdown for the
    summary."""

    status: str
    note: str
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""


@dataclass
class Session:
    """What the parts share: the plan, the output and scratch folders, the clock, the log, and the
    environment of every command."""

    plan: Plan
    out: Path
    scratch: Path
    budget: Budget
    log: SessionLog
    env: dict[str, str]

    def allowed(self, until: float, keep: float, hold: float = 0.0) -> float:
        """Seconds a command may run so that, with GRACE_S to stop it, it ends `hold` seconds before
        the fraction `until` of the budget and before the budget's last `keep` seconds."""
        return (
            self.budget.allow(until * self.budget.total_s - self.budget.elapsed() - hold, keep)
            - GRACE_S
        )

    def run(self, args: list[str], timeout_s: float, **options: Any) -> Outcome:
        return run_command(
            [sys.executable, *args], self.log, timeout_s, self.env, GRACE_S, **options
        )

    def reserve(self) -> float:
        """Seconds kept for the evaluation and the end when a part before them runs."""
        return EVAL_SHARE * self.budget.total_s + FINISH_S


def ended(outcome: Outcome, ok: bool) -> str:
    return "stopped" if outcome.stopped else "ok" if ok and outcome.returncode == 0 else "failed"


def run_tests(session: Session) -> PartResult:
    """The CUDA branch of the test suite (the CPU subset in a dry run), JUnit XML to tests.xml."""
    timeout = session.allowed(TESTS_UNTIL, session.reserve())
    if timeout < MIN_PART_S:
        return PartResult("skipped", "budget spent")
    report = session.out / "tests.xml"
    outcome = session.run(
        [
            "-m",
            "pytest",
            *session.plan.tests,
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            f"--junitxml={report}",
        ],
        timeout,
    )
    summary = junit_summary(report)
    if summary is None:
        return PartResult("failed", f"no test report ({outcome.last_line()})", outcome.seconds)
    note = summary.line() + (" (stopped: out of time)" if outcome.stopped else "")
    lines = ["## Tests", "", f"{note}; JUnit XML: tests.xml"] + [
        f"- failed: `{name}`" for name in summary.failed
    ]
    status = "failed" if summary.failures + summary.errors else ended(outcome, True)
    return PartResult(status, note, outcome.seconds, asdict(summary), "\n".join(lines))


def run_kernels(session: Session) -> PartResult:
    """`benchmarks.kernels.bench_attention`, one process per K, merged into kernels.json (CUDA only:
    a CPU run records why it did not run)."""
    results, outcome, seconds = [], None, 0.0
    for index, flags in enumerate(session.plan.kernel_runs):
        timeout = session.allowed(KERNELS_UNTIL, session.reserve())
        if timeout < MIN_PART_S:
            break
        folder = session.scratch / f"kernels-{index}"
        outcome = session.run(
            ["-m", "benchmarks.kernels.bench_attention", *flags, "--out-dir", str(folder)], timeout
        )
        seconds += outcome.seconds
        results += [json.loads(path.read_text()) for path in folder.glob("kernels-*.json")]
        if not results and session.plan.device == "cpu":
            return PartResult("skipped", outcome.last_line(), seconds)
    if not results:
        return PartResult(
            "skipped" if outcome is None else ended(outcome, False),
            "budget spent" if outcome is None else outcome.last_line(),
            seconds,
        )
    first = results[0]
    merged = {
        **first,
        "settings": [r["settings"] for r in results],
        "results": [row for r in results for row in r["results"]],
    }
    (session.out / "kernels.json").write_text(json.dumps(merged, indent=2) + "\n")
    header = (
        f"## Cross-attention kernels on {first['gpu']} (sm {first['capability']}, torch "
        f"{first['torch']}, "
        f"triton {first['triton']})\n\nbench_attention's --before-after run (issue 16: "
        "triton_baseline = the kernels before items 12-14, triton_unpacked = packing off, "
        "triton_ieee = TF32 off; fixed tiles), then its quick grid, one process per K; "
        f"H={first['settings']['heads']}, G={first['settings']['groups']}, Nk = K·Nq, B = G·(B/G); "
        "TFLOP/s count valid keys only; n/a = not supported, skip = over --max-gib."
    )
    providers = list(dict.fromkeys(p for r in results for p in r["settings"]["providers"]))
    table = bench_attention.markdown(merged["results"], providers, header)
    complete = len(results) == len(session.plan.kernel_runs)
    status = (
        "ok" if complete else "stopped" if outcome is not None and outcome.stopped else "failed"
    )
    return PartResult(
        status,
        f"{len(results)} of {len(session.plan.kernel_runs)} runs -> kernels.json",
        seconds,
        markdown=table,
    )


def run_engine(session: Session) -> PartResult:
    """`benchmarks.engine.bench_engine`, one process per available backend, merged into
    engine.json."""
    plan, rows, commands, header, seconds = session.plan, [], [], None, 0.0
    availability = {name: backend_availability(name, plan.device) for name in plan.engine}
    skipped = {name: why for name, (ok, why) in availability.items() if not ok}
    runnable = [name for name in plan.engine if name not in skipped]
    ended_as = {}  # backend: "stopped" or "failed", for those that left no results
    for index, name in enumerate(runnable):
        timeout = session.allowed(
            ENGINE_UNTIL, session.reserve(), BACKEND_RESERVE_S * (len(runnable) - index - 1)
        )
        if timeout < MIN_PART_S:
            skipped[name], ended_as[name] = "session budget spent", "stopped"
            continue
        path = session.scratch / f"engine-{name}.json"
        args = [
            "-m",
            "benchmarks.engine.bench_engine",
            "--device",
            plan.device,
            "--backends",
            name,
            *plan.engine[name],
            "--out",
            str(path),
        ]
        outcome = session.run(args, timeout)
        seconds += outcome.seconds
        commands.append("python -m " + " ".join(args[1:-2]))
        if not path.is_file():
            ended_as[name] = "stopped" if outcome.stopped else "failed"
            skipped[name] = (
                "stopped: out of time" if outcome.stopped else f"failed: {outcome.last_line()}"
            )
            continue
        result = json.loads(path.read_text())
        header = header or result["header"]
        rows += result["rows"]
    if header is None:
        return PartResult("failed", "; ".join(f"{n}: {why}" for n, why in skipped.items()), seconds)
    header = {**header, "command": " ; ".join(commands), "skipped": skipped}
    (session.out / "engine.json").write_text(
        json.dumps({"header": header, "rows": rows}, indent=2) + "\n"
    )
    ran = sorted({row["backend"] for row in rows})
    status = "failed" if "failed" in ended_as.values() else "stopped" if ended_as else "ok"
    text = engine_markdown(rows, header).replace("# Engine benchmark", "## Engine benchmark", 1)
    return PartResult(
        status,
        f"backends {', '.join(ran)} -> engine.json",
        seconds,
        {"backends": ran, "skipped": skipped},
        text,
    )


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in `run_dir` (None before the first)."""
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_weights(run_dir: Path, destination: Path) -> str:
    """Save the run's final weights, else its newest checkpoint's model, as fp16 weights with their
    compute record; returns which it was. CheckpointError when the run left neither."""
    final = run_dir / "final.safetensors"
    if final.is_file():
        model, record, source = load_model(final), read_training_record(final), "final.safetensors"
    else:
        model = load_run_model(run_dir)
        pointer = json.loads((run_dir / "latest.json").read_text())
        record, source = (
            checkpoint_compute_record(json.loads((run_dir / pointer["meta"]).read_text())),
            pointer["weights"],
        )
    save_weights(model, destination, dtype=torch.float16, training=record)
    return source


def training_figures(run_dir: Path) -> dict[str, Any]:
    """Steps, losses and speed from the run's log.jsonl, with the loss curve at about 50 points."""
    records = [
        r
        for r in read_log_records(run_dir / "log.jsonl")
        if isinstance(r.get("loss"), (int, float))
    ]
    if not records:
        return {"steps": 0}
    last = records[-50:]
    every = max(1, len(records) // 50)
    return {
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "mean_loss_last_50": sum(r["loss"] for r in last) / len(last),
        "episodes_per_s": records[-1].get("episodes_per_s"),
        "loss_curve": [[r["step"], round(r["loss"], 5)] for r in records[::every]],
    }


def run_training(session: Session) -> PartResult:
    """`promptseg train` from the initial weights on the packs (held-out datasets excluded), stopped
    when its time runs out; the final weights, or the newest checkpoint's, saved to WEIGHTS_NAME in
    fp16."""
    plan = session.plan
    names = {pack_dataset_name(folder) for folder in find_packs(plan.packs)}
    missing = sorted(set(plan.held_out) - names)
    if not names or missing:
        return PartResult(
            "skipped",
            f"no packs of {', '.join(missing) or 'any dataset'} in {plan.packs} "
            "(python -m benchmarks.gpu_pack makes them)",
        )
    timeout = session.allowed(1.0, session.reserve())
    if timeout < MIN_PART_S:
        return PartResult("skipped", "budget spent")
    config_path, run_dir = session.scratch / "train_config.json", session.scratch / "train"
    config_path.write_text(json.dumps(plan.train_config, indent=2))
    args = [
        "-m",
        "promptseg",
        "train",
        "--data",
        str(plan.packs),
        "--exclude",
        *plan.held_out,
        "--config",
        str(config_path),
        "--device",
        plan.device,
        "--init",
        str(plan.init),
        "--out",
        str(run_dir),
        "--no-progress",
    ]
    if plan.train_steps is not None:
        args += ["--steps", str(plan.train_steps)]
    progress = {"next": PROGRESS_EVERY_S}

    def monitor(elapsed: float) -> bool:
        step = latest_step(run_dir)
        if elapsed >= progress["next"]:
            progress["next"] += PROGRESS_EVERY_S
            figures = training_figures(run_dir)
            session.log.status(
                f"train: step {figures['steps']}, loss "
                f"{figures.get('last_loss', float('nan')):.4f}, "
                f"{figures.get('episodes_per_s') or 0:.1f} episodes/s, checkpoint {step}"
            )
        return (
            plan.stop_after_step is not None and step is not None and step >= plan.stop_after_step
        )

    outcome = session.run(args, timeout, monitor=monitor)
    figures = {**training_figures(run_dir), "returncode": outcome.returncode}
    try:
        figures["weights_from"] = export_weights(run_dir, session.out / WEIGHTS_NAME)
    except (CheckpointError, OSError, KeyError, ValueError) as error:
        return PartResult(
            "failed", f"no weights: {error} ({outcome.last_line()})", outcome.seconds, figures
        )
    finished = (run_dir / "final.safetensors").is_file()
    note = (
        f"{figures['steps']} steps, last loss {figures.get('last_loss', float('nan')):.4f}, "
        f"weights from {figures['weights_from']} -> {WEIGHTS_NAME}"
    )
    end = (
        "finished"
        if finished
        else f"stopped at checkpoint {plan.stop_after_step} (dry run)"
        if plan.stop_after_step is not None
        else "stopped: out of time"
    )
    lines = [
        "## Training",
        "",
        f"`python {' '.join(args)}`",
        "",
        note,
        f"{figures.get('episodes_per_s') or 0:.1f} episodes/s at the end; {end} after "
        f"{outcome.seconds:.0f} s.",
    ]
    return PartResult(ended(outcome, finished), note, outcome.seconds, figures, "\n".join(lines))


def mean_dice(path: Path, shots: tuple[int, ...]) -> dict[int, float]:
    """Mean Dice over tasks of method promptseg per K in an eval report (K that ran)."""
    report = EvalReport.load(path)
    means = {k: report.mean_over_tasks("promptseg", k) for k in shots}
    return {k: value[0] for k, value in means.items() if value is not None}


def run_eval(session: Session, weights: Path) -> PartResult:
    """`promptseg eval` of the trained weights on the held-out packs (eval.json), then of the
    initial weights on the same episodes when time is left, for the comparison."""
    plan = session.plan
    if not weights.is_file():
        return PartResult("skipped", "no trained weights")
    held = [str(p) for p in find_packs(plan.packs) if pack_dataset_name(p) in plan.held_out]
    common = [
        "-m",
        "promptseg",
        "eval",
        "--data",
        *held,
        "--shots",
        *map(str, plan.eval_shots),
        "--episodes",
        str(plan.eval_episodes),
        "--methods",
        "promptseg",
        "--device",
        plan.device,
        "--no-progress",
    ]
    report, table = session.out / "eval.json", session.scratch / "eval.md"
    timeout = session.allowed(1.0, FINISH_S)
    if timeout < MIN_PART_S:
        return PartResult("skipped", "budget spent")
    outcome = session.run(
        [*common, "--checkpoint", str(weights), "--out", str(report), "--markdown", str(table)],
        timeout,
    )
    if not report.is_file():
        return PartResult(
            ended(outcome, False), f"no report ({outcome.last_line()})", outcome.seconds
        )
    trained, seconds, initial = mean_dice(report, plan.eval_shots), outcome.seconds, {}
    init_report = session.scratch / "eval-init.json"
    timeout = session.allowed(1.0, FINISH_S)
    if timeout >= MIN_PART_S:
        seconds += session.run(
            [*common, "--checkpoint", str(plan.init), "--out", str(init_report)], timeout
        ).seconds
        if init_report.is_file():
            initial = mean_dice(init_report, plan.eval_shots)
    lines = [
        "## Held-out evaluation",
        "",
        f"Datasets {', '.join(plan.held_out)}; mean Dice over tasks:",
        "",
        "| K | trained | initial weights | difference |",
        "|---:|---:|---:|---:|",
    ]
    for k, value in trained.items():
        before = initial.get(k)
        lines.append(
            f"| {k} | {value:.1f} | {'–' if before is None else f'{before:.1f}'} | "
            f"{'–' if before is None else f'{value - before:+.1f}'} |"
        )
    note = (
        "mean Dice " + " / ".join(f"K={k}: {v:.1f}" for k, v in trained.items()) + " -> eval.json"
    )
    return PartResult(
        ended(outcome, True),
        note,
        seconds,
        {"trained": trained, "initial": initial},
        "\n".join([*lines, "", table.read_text() if table.is_file() else ""]),
    )
