"""Every GPU check in one prepared command: tests, kernel and engine figures, GPU training and the
held-out evaluation, within one time budget, with every result in one folder (issue 17).

Run from the repository root. On a GPU machine, with the packs made here first
(`python -m benchmarks.gpu_pack`, which writes device_data/) and carried along:

    python3 -m benchmarks.gpu_session --budget-s 540    # device run: carry=["device_data"]
    python -m benchmarks.gpu_session --dry-run          # the same plumbing on the CPU, tiny (CI)

The parts run in order, each within its share of --budget-s; what one leaves over goes to training:
1. tests (18%): pytest of the CUDA branch of the suite -> tests.xml, and a one-line summary;
2. kernels (16%): `benchmarks.kernels.bench_attention --before-after` (issue 16), then its quick
   grid, one process per K -> kernels.json;
   engine (22%): `benchmarks.engine.bench_engine` per CUDA backend, 256-slice volumes at K = 8 ->
   engine.json;
3. train (the rest, less 10% kept for the evaluation): `promptseg train` of configs/release_cpu.yaml
   from the shipped weights on the packs, the held-out datasets excluded, stopped when its time runs
   out -> promptseg-gpu.safetensors (fp16: the final weights, else the newest checkpoint's);
4. eval: `promptseg eval` of those weights on the held-out packs -> eval.json, beside the shipped
   weights' scores on the same episodes when time is left.
A command whose time runs out gets SIGINT (pytest writes its report, training keeps its last
checkpoint), then SIGKILL. The output folder (default: $OUT when set, else
benchmarks/results/gpu-session; runs/gpu-session-dry-run for a dry run) holds at most the 8 flat
files a device run returns: summary.md (status, GPU name, every table), summary.json, tests.xml,
kernels.json, engine.json, eval.json, the weights and session.log (every command's output).
Checkpoints, optimizer state and per-backend files stay in a temporary folder that is deleted at the
end. The exit status is 1 when a part failed or the output would not come back whole, else 0.

The GPU image has no nibabel, which promptseg imports: the packages gpu_pack vendored to --site are
put on the path when they do not import, and promptseg is imported only after that.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from benchmarks.gpu.outputs import (
    LOG_NAME,
    OUTPUT_NAMES,
    WEIGHTS_NAME,
    output_problems,
    trim_file,
)
from benchmarks.gpu.runner import REPO, Budget, SessionLog

GPU_BUDGET_S, DRY_BUDGET_S = 540.0, 240.0


def default_out(dry_run: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / ("runs/gpu-session-dry-run" if dry_run else "benchmarks/results/gpu-session")


def prepare_output(out: Path) -> None:
    """Create `out`, remove an earlier session's files from it; refuse a folder holding anything
    else."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(path.name for path in out.iterdir() if path.name not in OUTPUT_NAMES)
    if foreign:
        raise SystemExit(
            f"gpu_session: {out} holds other files ({', '.join(foreign[:5])}); give an empty --out"
        )
    for name in OUTPUT_NAMES:
        (out / name).unlink(missing_ok=True)


def child_environment(dry_run: bool) -> dict[str, str]:
    """The commands' environment: unbuffered output; in a dry run no GPU (even where there is one)
    and the Triton interpreter, on the GPU never the interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def use_site(site: Path, env: dict[str, str]) -> bool:
    """Put `site` (packages vendored by gpu_pack) on this process's and the commands' path when one
    of its packages does not import here; True when it was added."""
    if not site.is_dir():
        return False
    names = [p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    if all(importlib.util.find_spec(name) is not None for name in names):
        return False
    sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: $OUT, else benchmarks/results/gpu-session)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"seconds for everything (default {GPU_BUDGET_S:.0f}; dry run {DRY_BUDGET_S:.0f})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the same plumbing on the CPU with tiny shapes"
    )
    parser.add_argument(
        "--packed",
        type=Path,
        default=REPO / "device_data" / "packed",
        help="pack folders from benchmarks.gpu_pack (not read by a dry run, which makes its own)",
    )
    parser.add_argument(
        "--site",
        type=Path,
        default=REPO / "device_data" / "site",
        help="pure-Python packages vendored by benchmarks.gpu_pack",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        help="training steps (default: the recipe's; the budget stops it anyway)",
    )
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    args.out = args.out or default_out(args.dry_run)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_session: no CUDA GPU here; --dry-run runs the plumbing on the CPU")
    prepare_output(args.out)
    budget = Budget(args.budget_s)
    log = SessionLog(args.out / LOG_NAME, budget)
    env = child_environment(args.dry_run)
    use_site(args.site, env)
    # promptseg imports nibabel, which may come from the site: import the parts only now.
    from benchmarks.gpu import parts, plan, report

    command = "python -m benchmarks.gpu_session " + " ".join(sys.argv[1:] if argv is None else argv)
    environment = report.describe_environment()
    log.status(f"{report.machine_name(environment)}: {command}")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-session-"))
    try:
        session_plan = (
            plan.dry_plan(scratch) if args.dry_run else plan.gpu_plan(args.packed, args.train_steps)
        )
        session = parts.Session(session_plan, args.out, scratch, budget, log, env)
        steps = {
            "tests": parts.run_tests,
            "kernels": parts.run_kernels,
            "engine": parts.run_engine,
            "train": parts.run_training,
            "eval": lambda s: parts.run_eval(s, args.out / WEIGHTS_NAME),
        }
        results = {}
        for name, step in steps.items():
            log.status(f"{name}: starting, {budget.left():.0f} s of the budget left")
            try:
                results[name] = step(session)
            except Exception as error:  # noqa: BLE001 - one broken part must not cost the others' results
                log.write(traceback.format_exc())
                results[name] = parts.PartResult("failed", f"{type(error).__name__}: {error}")
            log.status(f"{name}: {results[name].status}: {results[name].note}")
        text = report.write_summary(
            args.out, environment, session_plan, results, command, budget.elapsed(), args.budget_s
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trim_file(log.path)
    problems = output_problems(args.out)
    print(text)
    for problem in problems:
        print(f"gpu_session: output will not come back whole: {problem}", file=sys.stderr)
    return 1 if problems or any(result.status == "failed" for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
