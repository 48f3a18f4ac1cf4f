"""Training recipe: one YAML or JSON file reproduces a run (`promptseg train --config FILE`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptseg.errors import InputError
from promptseg.kernels import ATTENTION_KERNELS
from promptseg.model import ModelConfig

# Integer fields and their ranges (inclusive); `shots` and `val_shots` are bounded by the model's
# max_prompts.
INT_RANGES: dict[str, tuple[int, int]] = {
    "steps": (1, 10**9),
    "episodes_per_step": (1, 4096),
    "queries": (1, 1024),
    "warmup_steps": (0, 10**9),
    "loader_workers": (0, 256),
    "checkpoint_every": (1, 10**9),
    "val_every": (1, 10**9),
    "val_episodes": (1, 10**6),
    "axis": (0, 2),
    "seed": (0, 2**32 - 1),
    "max_corrections": (1, 64),
}
FRACTIONS = (
    "synthetic_fraction",
    "volume_fraction",
    "sparse_fraction",
    "self_query_fraction",
    "hardness_mix",
    "min_lr_ratio",
    "correction_fraction",
)
NON_NEGATIVE = (
    "weight_decay",
    "grad_clip",
    "dice_weight",
    "correction_lr_scale",
    "correction_region_weight",
)
FLAGS = ("task_augment", "image_augment", "mixed_precision")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    return repr(value)[:60]


# Keys renamed since runs were first written: train_config.json and checkpoints of older runs still
# load.
RENAMED_KEYS = {"attention_backend": "attention_kernel"}


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run; `model` holds ModelConfig fields."""

    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    episodes_per_step: int = 4
    shots: tuple[int, int] = (1, 16)
    queries: int = 4
    synthetic_fraction: float = 0.3
    volume_fraction: float = 0.0  # share of synthetic tasks built from phantom-volume slices
    sparse_fraction: float = 0.15
    self_query_fraction: float = (
        0.0  # share of sparse episodes whose first query is the prompted image
    )
    task_augment: bool = True
    image_augment: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    dice_weight: float = 1.0
    mixed_precision: bool = (
        True  # bf16 autocast on CUDA with bf16 and on CPUs with AVX512-BF16 or AMX
    )
    loader_workers: int = (
        0  # processes preparing episode batches ahead of the model (0: in the training process)
    )
    hardness_mix: float = (
        0.5  # share of task draws weighted by running loss (promptseg.train.task_balance)
    )
    checkpoint_every: int = 200
    val_every: int = 200
    val_episodes: int = 4
    val_shots: int = 4
    axis: int = 2
    seed: int = 0
    attention_kernel: str | None = None  # None: Triton on CUDA when available, else SDPA
    # share of queries given simulated clicks on themselves (a model with query_corrections only;
    # promptseg.train.simulated_corrections), and the most clicks one query gets
    correction_fraction: float = 0.0
    max_corrections: int = 5
    correction_lr_scale: float = 10.0  # the new correction layers learn this much faster
    # extra BCE weight on the error regions the simulated clicks point at (0: none)
    correction_region_weight: float = 0.0

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def problems(self) -> list[str]:
        """What is wrong with the field values (types and ranges; the model config included), as
        `key: problem` texts; empty for a valid config."""
        found = []
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                found.append(f"{name}: must be an integer in {low}..{high}, got {_shown(value)}")
        for name in FRACTIONS:
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                found.append(f"{name}: must be a number in [0, 1], got {_shown(value)}")
        for name in NON_NEGATIVE:
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                found.append(f"{name}: must be a finite number >= 0, got {_shown(value)}")
        if not _is_real(self.lr) or not 0 < self.lr <= 10:
            found.append(f"lr: must be a number in (0, 10], got {_shown(self.lr)}")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                found.append(f"{name}: must be true or false, got {_shown(getattr(self, name))}")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            found.append(
                f"attention_kernel: must be one of {', '.join(ATTENTION_KERNELS)} (or absent), got "
                f"{_shown(self.attention_kernel)}"
            )
        if not isinstance(self.model, dict):
            return [
                *found,
                f"model: must be a mapping of model config keys, got {_shown(self.model)}",
            ]
        try:
            max_prompts = self.model_config().max_prompts
        except (TypeError, ValueError) as exc:
            return [*found, f"model: {exc}"]
        if self.correction_fraction > 0 and not self.model_config().query_corrections:
            found.append(
                "correction_fraction: simulated corrections need a model with query_corrections: "
                "true"
            )
        shots = self.shots
        if not (
            isinstance(shots, tuple)
            and len(shots) == 2
            and all(_is_int(n) for n in shots)
            and 1 <= shots[0] <= shots[1] <= max_prompts
        ):
            found.append(
                f"shots: must be two integers 1 <= low <= high <= {max_prompts} (the model's "
                "max_prompts), "
                f"got {_shown(shots)}"
            )
        if not _is_int(self.val_shots) or not 1 <= self.val_shots <= max_prompts:
            found.append(
                f"val_shots: must be an integer in 1..{max_prompts}, got {_shown(self.val_shots)}"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> TrainConfig:
        data = {RENAMED_KEYS.get(key, key): value for key, value in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(source, f"unknown training config keys: {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("shots"), list):
            values["shots"] = tuple(values["shots"])
        config = cls(**values)
        problems = config.problems()
        if problems:
            raise InputError(
                source,
                f"invalid training config: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            )
        return config

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "file not found")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except RecursionError:
            raise InputError(path, "unreadable config (nested too deeply)") from None
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise InputError(path, f"unreadable config ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise InputError(path, "config must be a mapping of keys to values")
        return cls.from_dict(data, str(path))
