"""Weights and training checkpoints: safetensors plus JSON only, never pickle.

Model weights: one .safetensors file whose metadata holds the model config ("promptseg_config").
Training checkpoints in a run directory: `step-N.safetensors` (model + optimizer tensors) and
`step-N.json` (step, configs, optimizer hyper-parameters); `latest.json` names the newest complete
checkpoint and is replaced atomically last, so a write cut off part-way never damages the previous one.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from promptseg.data.io import atomic_write_unchecked
from promptseg.errors import CheckpointError, short_reason
from promptseg.model import ModelConfig, PromptSegNet

CONFIG_KEY = "promptseg_config"
TRAINING_KEY = "promptseg_training"  # cumulative compute behind the weights (episodes, core-hours, runs)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Trained weights stay far below this (the shipped ones below 6); larger values are damage, and
# would give non-finite activations.
MAX_WEIGHT_MAGNITUDE = 1e4


def _atomic_replace(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` and move the flushed result over `path` (io.atomic_write_unchecked),
    so `path` is always either the old or the complete new file. A failing file system raises OSError
    (a training run stops with it, its previous checkpoint intact)."""
    atomic_write_unchecked(path, write, overwrite=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)

    _atomic_replace(path, write)


def save_weights(
    model: PromptSegNet,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write the model's weights (optionally cast, e.g. to float16) with its config as metadata, and
    `training` (the cumulative compute record, JSON) when given."""
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()).contiguous().cpu()
        for name, t in _unshare(model.state_dict()).items()
    }
    metadata = {CONFIG_KEY: model.config.to_json(), "format": "promptseg-weights-v1"}
    if training is not None:
        metadata[TRAINING_KEY] = json.dumps(training, sort_keys=True)
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per storage (the encoder and blocks are shared by two sub-modules)."""
    seen: dict[tuple[int, int], str] = {}
    unique = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen[key] = name
        unique[name] = tensor
    return unique


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read (config, state dict) from a weights file; CheckpointError names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({short_reason(exc)})") from None
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path}: no PromptSeg config in the checkpoint metadata")
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc})") from None
    check_weight_values({n: t for n, t in tensors.items() if not n.startswith("optim.")}, path)  # optimizer state may be large
    return config, tensors


def check_weight_values(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """CheckpointError naming `source` unless every tensor is floating point (float16/32/64, bfloat16),
    finite, and at most MAX_WEIGHT_MAGNITUDE in magnitude."""
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{source}: weight {name} has data type {str(tensor.dtype).replace('torch.', '')}, "
                                  "expected floating point")
        if tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: weight {name} holds non-finite values (NaN or Inf)")
        largest = float(tensor.abs().max())
        if largest > MAX_WEIGHT_MAGNITUDE:
            raise CheckpointError(f"{source}: weight {name} holds {largest:.3g}, beyond the plausible "
                                  f"magnitude {MAX_WEIGHT_MAGNITUDE:g} of trained weights")


def read_training_record(path: str | os.PathLike) -> dict[str, Any]:
    """The compute record in a weights file's metadata ({} when it has none or it is unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(TRAINING_KEY)
        record = json.loads(text) if text else {}
    except (SafetensorError, OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_state(model: PromptSegNet, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load a state dict whose names and shapes must match `model` exactly (shared weights allowed)."""
    expected = model.state_dict()
    shared_names = check_state_shapes(expected, tensors, source)
    full = dict(tensors)
    for name in shared_names:
        full[name] = tensors[_alias_of(name, tensors)]
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(full[name].to(tensor.dtype))


def check_state_shapes(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str | os.PathLike
) -> set[str]:
    """CheckpointError unless `tensors` has exactly the names and shapes of the state dict `expected`
    (names of shared sub-modules may be given once); returns the names found through their alias."""
    missing_names = [n for n in expected if n not in tensors]
    shared_names = {n for n in missing_names if _alias_of(n, tensors) is not None}
    missing = [n for n in missing_names if n not in shared_names]
    unexpected = [n for n in tensors if n not in expected]
    wrong = [n for n in tensors if n in expected and tensors[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise CheckpointError(
            f"{source}: checkpoint of another configuration ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {detail})"
        )
    return shared_names


def _alias_of(name: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """Sub-modules share the encoder and attention blocks: map e.g. 'prompt_encoder.encoder.x' to 'encoder.x'."""
    for prefix in ("prompt_encoder.", "query_decoder."):
        if name.startswith(prefix) and name[len(prefix):] in tensors:
            return name[len(prefix):]
    return None


def load_model(path: str | os.PathLike, expected: ModelConfig | None = None) -> PromptSegNet:
    """Build a PromptSegNet from a weights file (float32); `expected` rejects other configurations."""
    config, tensors = read_weights(path)
    if expected is not None and expected != config:
        raise CheckpointError(f"{path}: checkpoint of another configuration (expected {expected}, found {config})")
    return build_model(config, tensors, path)


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> PromptSegNet:
    """A PromptSegNet of `config` holding `tensors`, in eval mode. The config's tensor names and shapes
    are compared with `tensors` on a model without storage (the meta device) first, so a config that
    implies other (or far more) parameters than the file holds is refused before memory is allocated."""
    with torch.device("meta"):
        skeleton = PromptSegNet(config)
    check_state_shapes(skeleton.state_dict(), tensors, source)
    model = PromptSegNet(config)
    load_state(model, tensors, source)
    return model.eval()


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: PromptSegNet,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write step-N.safetensors + step-N.json, then point latest.json at them; keep the newest `keep`."""
    run_dir = Path(run_dir)
    tensors = {f"model.{n}": t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    tensors = _unshare(tensors)
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
    weights_path = run_dir / f"step-{step}.safetensors"
    _atomic_replace(weights_path, lambda tmp: save_file(tensors, tmp, metadata={CONFIG_KEY: model.config.to_json()}))
    meta = {
        "step": step,
        "model_config": model.config.to_dict(),
        "param_groups": optim_state["param_groups"],
        "optim_scalars": {
            str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in optim_state["state"].items()
        },
        **info,
    }
    _write_json(run_dir / f"step-{step}.json", meta)
    _write_json(run_dir / "latest.json", {"step": step, "weights": weights_path.name, "meta": f"step-{step}.json"})
    old = sorted(run_dir.glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))[:-keep]
    for meta_path in old:
        meta_path.unlink(missing_ok=True)
        meta_path.with_suffix(".safetensors").unlink(missing_ok=True)
    return weights_path


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is missing or not a JSON object."""
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
        raise CheckpointError(f"{latest}: damaged pointer (weights and meta must name files in {run_dir})")
    return run_dir / names[0], run_dir / names[1]


def load_training_checkpoint(
    run_dir: str | os.PathLike, model: PromptSegNet, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint of `run_dir` into model and optimizer; its JSON, or None.

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
        raise CheckpointError(f"{weights_path}: unreadable checkpoint ({short_reason(exc)})") from None
    model_tensors = {n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")}
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
        raise CheckpointError(f"{meta_path}: step or optimizer state does not fit this run ({short_reason(exc)})") from None
    return meta


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_resume_state(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], groups: Any, step: Any) -> None:
    """ValueError (TypeError for a malformed group) unless a checkpoint's step, AdamW hyper-parameters and per-parameter state fit
    `optimizer`: a non-negative integer step; lr, weight_decay >= 0, eps > 0 and betas in [0, 1); and
    for each parameter, finite tensors with exp_avg and exp_avg_sq of the parameter's shape
    (exp_avg_sq >= 0) and a non-negative scalar step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}"[:120])
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"expected {len(optimizer.param_groups)} optimizer parameter groups")
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError("optimizer parameter groups must be mappings")
        for key in ("lr", "weight_decay", "eps"):
            if key in group and not (_finite_number(group[key]) and group[key] >= 0 and (key != "eps" or group[key] > 0)):
                raise ValueError(f"optimizer {key} out of range: {group[key]!r}"[:120])
        betas = group.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_finite_number(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"optimizer betas must be two numbers in [0, 1), got {betas!r}"[:120])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index}, the run has {len(params)}")
        for key, value in entry.items():
            if not torch.is_tensor(value):
                continue
            if key in ("exp_avg", "exp_avg_sq") and value.shape != params[index].shape:
                raise ValueError(f"optimizer {key} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(params[index].shape)}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"optimizer {key} of parameter {index} is not finite floating point")
            if (key == "exp_avg_sq" and bool((value < 0).any())) or (key == "step" and (value.numel() != 1 or float(value) < 0)):
                raise ValueError(f"optimizer {key} of parameter {index} out of range")


def load_run_model(run_dir: str | os.PathLike) -> PromptSegNet:
    """The model of the newest complete training checkpoint in `run_dir` (no optimizer needed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest.json").is_file():
        raise CheckpointError(f"{run_dir}: no training checkpoint (latest.json missing)")
    weights_path, _ = _latest_files(run_dir)
    config, tensors = read_weights(weights_path)
    return build_model(config, {n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")}, weights_path)
