"""Training checkpoints: safetensors plus JSON only, never pickle (model weights:
promptseg.model.weights).

Training checkpoints in a run directory: `step-N.safetensors` (model + optimizer tensors) and
`step-N.json` (step, configs, optimizer hyper-parameters); `latest.json` names the newest complete
checkpoint and is replaced atomically last, so a write cut off part-way never damages the previous
one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promptseg.errors import CheckpointError, short_reason
from promptseg.files import atomic_write_unchecked, write_json_unchecked
from promptseg.model import PromptSegNet
from promptseg.model.weights import (
    CONFIG_KEY,
    build_model,
    check_weight_values,
    load_state,
    read_weights,
)


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: PromptSegNet,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write step-N.safetensors + step-N.json, then point latest.json at them; keep the newest
    `keep`."""
    run_dir = Path(run_dir)
    tensors = {f"model.{n}": t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
    weights_path = run_dir / f"step-{step}.safetensors"
    atomic_write_unchecked(
        weights_path,
        lambda tmp: save_file(tensors, tmp, metadata={CONFIG_KEY: model.config.to_json()}),
        overwrite=True,
    )
    meta = {
        "step": step,
        "model_config": model.config.to_dict(),
        "param_groups": optim_state["param_groups"],
        "optim_scalars": {
            str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)}
            for i, s in optim_state["state"].items()
        },
        **info,
    }
    write_json_unchecked(run_dir / f"step-{step}.json", meta)
    write_json_unchecked(
        run_dir / "latest.json",
        {"step": step, "weights": weights_path.name, "meta": f"step-{step}.json"},
    )
    old = sorted(run_dir.glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))[:-keep]
    for meta_path in old:
        meta_path.unlink(missing_ok=True)
        meta_path.with_suffix(".safetensors").unlink(missing_ok=True)
    return weights_path


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is missing or not a JSON
    object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({short_reason(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unreadable checkpoint file (expected a JSON object)")
    return data


def _latest_files(run_dir: Path) -> tuple[Path, Path]:
    """(weights, meta) paths named by run_dir/latest.json; CheckpointError when it is damaged."""
    latest = run_dir / "latest.json"
    pointer = _read_json(latest)
    names = [pointer.get("weights"), pointer.get("meta")]
    if not all(isinstance(name, str) and name and Path(name).name == name for name in names):
        raise CheckpointError(
            f"{latest}: damaged pointer (weights and meta must name files in {run_dir})"
        )
    return run_dir / names[0], run_dir / names[1]


def load_training_checkpoint(
    run_dir: str | os.PathLike, model: PromptSegNet, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint of `run_dir` into model and optimizer; its JSON, or
    None.

    Raises CheckpointError (one line naming the file) on a damaged or pickle-bearing checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "latest.json").is_file():
        return None
    weights_path, meta_path = _latest_files(run_dir)
    meta = _read_json(meta_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{weights_path}: unreadable checkpoint ({short_reason(exc)})"
        ) from None
    model_tensors = {n[len("model.") :]: t for n, t in tensors.items() if n.startswith("model.")}
    check_weight_values(model_tensors, weights_path)
    load_state(model, model_tensors, weights_path)
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, tensor in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = tensor
        for index, scalars in meta.get("optim_scalars", {}).items():
            state.setdefault(int(index), {}).update(scalars)
        check_resume_state(optimizer, state, meta["param_groups"], meta["step"])
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{meta_path}: step or optimizer state does not fit this run ({short_reason(exc)})"
        ) from None
    return meta


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_resume_state(
    optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], groups: Any, step: Any
) -> None:
    """ValueError (TypeError for a malformed group) unless a checkpoint's step, AdamW
    hyper-parameters and per-parameter state fit `optimizer`: a non-negative integer step; lr,
    weight_decay >= 0, eps > 0 and betas in [0, 1); and for each parameter, finite tensors with
    exp_avg and exp_avg_sq of the parameter's shape (exp_avg_sq >= 0) and a non-negative scalar
    step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}"[:120])
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"expected {len(optimizer.param_groups)} optimizer parameter groups")
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError("optimizer parameter groups must be mappings")
        for key in ("lr", "weight_decay", "eps"):
            if key in group and not (
                _finite_number(group[key]) and group[key] >= 0 and (key != "eps" or group[key] > 0)
            ):
                raise ValueError(f"optimizer {key} out of range: {group[key]!r}"[:120])
        betas = group.get("betas", (0.9, 0.999))
        if not (
            isinstance(betas, (list, tuple))
            and len(betas) == 2
            and all(_finite_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"optimizer betas must be two numbers in [0, 1), got {betas!r}"[:120])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index}, the run has {len(params)}")
        for key, value in entry.items():
            if not torch.is_tensor(value):
                continue
            if key in ("exp_avg", "exp_avg_sq") and value.shape != params[index].shape:
                raise ValueError(
                    f"optimizer {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"expected {tuple(params[index].shape)}"
                )
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"optimizer {key} of parameter {index} is not finite floating point"
                )
            if (key == "exp_avg_sq" and bool((value < 0).any())) or (
                key == "step" and (value.numel() != 1 or float(value) < 0)
            ):
                raise ValueError(f"optimizer {key} of parameter {index} out of range")


def load_run_model(run_dir: str | os.PathLike) -> PromptSegNet:
    """The model of the newest complete training checkpoint in `run_dir` (no optimizer needed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest.json").is_file():
        raise CheckpointError(f"{run_dir}: no training checkpoint (latest.json missing)")
    weights_path, _ = _latest_files(run_dir)
    config, tensors = read_weights(weights_path)
    return build_model(
        config,
        {n[len("model.") :]: t for n, t in tensors.items() if n.startswith("model.")},
        weights_path,
    )
