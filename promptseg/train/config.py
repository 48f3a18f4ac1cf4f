"""Training recipe: one YAML or JSON file reproduces a run (`promptseg train --config FILE`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptseg.errors import InputError
from promptseg.model import ModelConfig


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
    self_query_fraction: float = 0.0  # share of sparse episodes whose first query is the prompted image
    task_augment: bool = True
    image_augment: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    dice_weight: float = 1.0
    mixed_precision: bool = True  # bf16 autocast on CUDA with bf16 and on CPUs with AVX512-BF16 or AMX
    loader_workers: int = 0  # processes preparing episode batches ahead of the model (0: in the training process)
    hardness_mix: float = 0.5  # share of task draws weighted by running loss (promptseg.train.task_balance)
    checkpoint_every: int = 200
    val_every: int = 200
    val_episodes: int = 4
    val_shots: int = 4
    axis: int = 2
    seed: int = 0
    attention_backend: str | None = None  # None: Triton on CUDA when available, else SDPA

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(source, f"unknown training config keys: {', '.join(unknown)}")
        values = dict(data)
        if "shots" in values:
            values["shots"] = tuple(values["shots"])
        config = cls(**values)
        try:
            config.model_config()
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"invalid model config: {exc}") from None
        return config

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "file not found")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise InputError(path, f"unreadable config ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise InputError(path, "config must be a mapping of keys to values")
        return cls.from_dict(data, str(path))
