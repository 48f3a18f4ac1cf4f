"""Model weights: one safetensors file, its config in the metadata, never pickle (docs/design.md
section 7).

The model owns its file format: `save_weights` / `load_model` write and read it, `weights_sha256`
tells exports of other weights apart, and `packaged_weights_path` is where the shipped weights live
inside the package. Training checkpoints (weights plus optimizer state) are
promptseg.train.checkpoint's.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from promptseg.errors import CheckpointError, short_reason
from promptseg.files import atomic_write_unchecked
from promptseg.model.config import ModelConfig
from promptseg.model.network import PromptSegNet

DEFAULT_WEIGHTS = "promptseg_default.safetensors"


CONFIG_KEY = "promptseg_config"


TRAINING_KEY = (
    "promptseg_training"  # cumulative compute behind the weights (episodes, core-hours, runs)
)


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Trained weights stay far below this (the shipped ones below 6); larger values are damage, and
# would give non-finite activations.
MAX_WEIGHT_MAGNITUDE = 1e4


def save_weights(
    model: PromptSegNet,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write the model's weights (optionally cast, e.g. to float16) with its config as metadata, and
    `training` (the cumulative compute record, JSON) when given."""
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach())
        .contiguous()
        .cpu()
        for name, t in model.state_dict().items()
    }
    metadata = {CONFIG_KEY: model.config.to_json(), "format": "promptseg-weights-v1"}
    if training is not None:
        metadata[TRAINING_KEY] = json.dumps(training, sort_keys=True)
    atomic_write_unchecked(
        path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=True
    )


def read_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read (config, state dict) from a weights file; CheckpointError names the file on any
    problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a safetensors checkpoint ({short_reason(exc)})"
        ) from None
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path}: no PromptSeg config in the checkpoint metadata")
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc})") from None
    check_weight_values(
        {n: t for n, t in tensors.items() if not n.startswith("optim.")}, path
    )  # optimizer state may be large
    return config, tensors


def check_weight_values(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """CheckpointError naming `source` unless every tensor is floating point (float16/32/64,
    bfloat16), finite, and at most MAX_WEIGHT_MAGNITUDE in magnitude."""
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"{source}: weight {name} has data type {str(tensor.dtype).replace('torch.', '')}, "
                "expected floating point"
            )
        if tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: weight {name} holds non-finite values (NaN or Inf)")
        largest = float(tensor.abs().max())
        if largest > MAX_WEIGHT_MAGNITUDE:
            raise CheckpointError(
                f"{source}: weight {name} holds {largest:.3g}, beyond the plausible "
                f"magnitude {MAX_WEIGHT_MAGNITUDE:g} of trained weights"
            )


def read_training_record(path: str | os.PathLike) -> dict[str, Any]:
    """The compute record in a weights file's metadata ({} when it has none or it is unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(TRAINING_KEY)
        record = json.loads(text) if text else {}
    except (SafetensorError, OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def without_aliases(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one-time key map of the legacy layout: state dicts of models built before each sub-module
    had one owner also named the shared encoder, blocks and propagation heads under
    "prompt_encoder." and "query_decoder."; those aliases of a name present at the top are
    dropped."""
    aliases = ("prompt_encoder.", "query_decoder.")
    return {
        name: tensor
        for name, tensor in tensors.items()
        if not (name.startswith(aliases) and name.split(".", 1)[1] in tensors)
    }


def load_state(
    model: PromptSegNet, tensors: dict[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """Load a state dict whose names and shapes must match `model` exactly."""
    expected = model.state_dict()
    tensors = without_aliases(tensors)
    check_state_shapes(expected, tensors, source)
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(tensors[name].to(tensor.dtype))


def check_state_shapes(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """CheckpointError unless `tensors` has exactly the names and shapes of the state dict
    `expected`."""
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    wrong = [n for n in tensors if n in expected and tensors[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise CheckpointError(
            f"{source}: checkpoint of another configuration ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {detail})"
        )


def load_model(path: str | os.PathLike, expected: ModelConfig | None = None) -> PromptSegNet:
    """Build a PromptSegNet from a weights file (float32); `expected` rejects other
    configurations."""
    config, tensors = read_weights(path)
    if expected is not None and expected != config:
        raise CheckpointError(
            f"{path}: checkpoint of another configuration (expected {expected}, found {config})"
        )
    return build_model(config, tensors, path)


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], source: str | os.PathLike
) -> PromptSegNet:
    """A PromptSegNet of `config` holding `tensors`, in eval mode. The config's tensor names and
    shapes are compared with `tensors` on a model without storage (the meta device) first, so a
    config that implies other (or far more) parameters than the file holds is refused before memory
    is allocated."""
    with torch.device("meta"):
        skeleton = PromptSegNet(config)
    tensors = without_aliases(tensors)
    check_state_shapes(skeleton.state_dict(), tensors, source)
    model = PromptSegNet(config)
    load_state(model, tensors, source)
    return model.eval()


def weights_sha256(model: PromptSegNet) -> str:
    """SHA-256 over the state dict's names and float32 values: tells exports of other weights
    apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()


def packaged_weights_path() -> Path:
    """The weights shipped inside the package (promptseg/weights/promptseg_default.safetensors)."""
    return Path(str(resources.files("promptseg") / "weights" / DEFAULT_WEIGHTS))
