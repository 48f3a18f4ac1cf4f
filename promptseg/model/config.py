"""Model configuration, serialised as JSON beside every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of PromptSegNet.

    widths[i] is the channel count at stride 2 ** (i + 1); `attention_stages` index into widths and
    mark the strides where query tokens cross-attend to prompt tokens. `label_propagation` adds,
    at each attention stage, a label-propagation prior (promptseg.model.propagation) that feeds the
    decoder and, from the first attention stage, the output logits.
    """

    resolution: int = 128
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 192)
    blocks_per_stage: int = 2
    attention_stages: tuple[int, ...] = (2, 3)
    attention_depth: int = 2
    head_dim: int = 32
    mlp_ratio: float = 2.0
    bottleneck_tokens: int = 0
    label_propagation: bool = True
    max_prompts: int = 64
    num_prompt_types: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resolution % (2 ** len(self.widths)) != 0:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {2 ** len(self.widths)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.label_propagation and self.bottleneck_tokens > 0:
            raise ValueError("label_propagation needs every prompt token; set label_propagation to false to use bottleneck_tokens")
        for stage in self.attention_stages:
            if not 0 <= stage < len(self.widths):
                raise ValueError(f"attention stage {stage} outside 0..{len(self.widths) - 1}")
            if self.widths[stage] % self.head_dim != 0:
                raise ValueError(f"width {self.widths[stage]} is not a multiple of head_dim {self.head_dim}")

    @property
    def encoding_entries(self) -> tuple[str, ...]:
        """Names of the cached (k, v) pairs of one attention stage: its blocks, then the propagation."""
        blocks = tuple(f"b{block}" for block in range(self.attention_depth))
        return blocks + (("propagation",) if self.label_propagation else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("widths", "attention_stages"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
