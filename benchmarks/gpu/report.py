"""The session's record: the machine it ran on, and summary.md / summary.json over every part."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.parts import PartResult
from benchmarks.gpu.plan import Plan

NVIDIA_SMI_FIELDS = (
    "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit"
)


def module_version(name: str) -> str:
    """The version of an importable module, or why it does not import (one line)."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure is a finding to record, not to raise
        first = str(error).splitlines()[0] if str(error) else ""
        return f"not importable ({type(error).__name__}: {first})"
    return str(getattr(module, "__version__", "unknown version"))


def nvidia_smi() -> str:
    """nvidia-smi's reading of the GPU (name, driver, memory, clocks, power), '' without it."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def describe_environment() -> dict[str, Any]:
    """Python, torch, CUDA and GPU, Triton, ONNX Runtime providers, TensorRT and the CPU count."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": cuda,
        "triton": module_version("triton"),
        "onnxruntime": module_version("onnxruntime"),
        "tensorrt": module_version("tensorrt"),
        "nvidia_smi": nvidia_smi(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def machine_name(environment: dict[str, Any]) -> str:
    return environment.get("gpu") or f"CPU ({environment['cpus']} cores), no GPU"


def write_summary(
    out: Path,
    environment: dict[str, Any],
    plan: Plan,
    parts: dict[str, PartResult],
    command: str,
    seconds: float,
    budget_s: float,
) -> str:
    """Write summary.json (everything) and summary.md (status lines, then each part's tables);
    returns the markdown."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 - Python 3.10
    record = {
        "date": date,
        "command": command,
        "seconds": round(seconds, 1),
        "budget_s": budget_s,
        "environment": environment,
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()},
        "parts": {name: asdict(part) for name, part in parts.items()},
    }
    for part in record["parts"].values():
        part.pop("markdown")
    (out / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    title = "GPU session dry run (CPU)" if plan.dry_run else "GPU session"
    versions = (
        f"torch {environment['torch']}, triton {environment['triton']}, "
        f"CUDA {environment['cuda_runtime']}"
    )
    head = [
        f"# {title}: {machine_name(environment)}",
        "",
        f"{date}; `{command}`; {seconds:.0f} s of a {budget_s:.0f} s budget; {versions}",
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    head += [
        f"| {name} | {part.status} | {part.seconds:.0f} | {part.note.replace('|', '/')} |"
        for name, part in parts.items()
    ]
    sections = [part.markdown.strip() for part in parts.values() if part.markdown.strip()]
    text = "\n\n".join(["\n".join(head), *sections]) + "\n"
    (out / "summary.md").write_text(text)
    return text
