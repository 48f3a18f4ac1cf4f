"""Model configuration, serialised as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Ranges every field must lie in; wide enough for any model worth training, narrow enough that no
# value can make building the model exhaust memory before the weights are compared with it.
INT_RANGES: dict[str, tuple[int, int]] = {
    "resolution": (16, 4096),
    "blocks_per_stage": (0, 32),
    "attention_depth": (1, 64),
    "head_dim": (1, 4096),
    "bottleneck_tokens": (0, 4096),
    "max_prompts": (1, 1024),
    "num_prompt_types": (5, 64),  # prompt type ids 0..4: query, mask, click, box, scribble
}
WIDTH_RANGE = (1, 4096)
MAX_STAGES = 8
MLP_RATIO_RANGE = (0.0, 16.0)  # exclusive low, inclusive high


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    """TypeError unless `value` is an int (not a bool), ValueError unless it lies in low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}"[:200])
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in {low}..{high}, got {value}")


def _check_ints(name: str, values: Any, low: int, high: int, max_count: int) -> None:
    """ValueError unless `values` is a tuple of 1..max_count ints in low..high."""
    if not isinstance(values, tuple) or not 1 <= len(values) <= max_count:
        raise ValueError(
            f"{name} must be a list of 1 to {max_count} integers, got {values!r}"[:200]
        )
    for value in values:
        _check_int(f"{name} entry", value, low, high)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of PromptSegNet.

    widths[i] is the channel count at stride 2 ** (i + 1); `attention_stages` index into widths and
    mark the strides where query tokens cross-attend to prompt tokens. `label_propagation` adds,
    at each attention stage, a label-propagation prior (promptseg.model.propagation) that feeds the
    decoder and, from the first attention stage, the output logits.

    `architecture` "conv" is that design; "vit" is the PromptSeg paper's (promptseg.model.vit): a
    ViT image encoder (patch_size, encoder_depth, encoder_width) and a transformer of
    attention_depth layers of decoder_width over prompt-pair and query tokens, with resolution,
    in_channels, head_dim, mlp_ratio, bottleneck_tokens, max_prompts and num_prompt_types as above;
    widths, blocks_per_stage and attention_stages are unused and label_propagation must be false.
    The architecture fields are left out of `to_dict` at their defaults, so configs of the conv
    design serialise as before.

    `sparse_unknown` (conv design with label propagation): the prior treats the prompt tokens a
    click or scribble does not touch as unknown (label 0.5) instead of background (label 0); it
    changes no tensor, so weights warm-start across it. False, the default, is what the shipped
    weights were trained with; like the architecture fields it is left out of `to_dict` when false.

    `query_corrections` (conv design): each query may come with correction maps, the user's clicks
    and scribbles on the query itself (promptseg.model.query_corrections), read by a convolution
    beside the encoder's stem that starts at zero, so weights without it warm-start into it. Left
    out of `to_dict` when false.
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
    sparse_unknown: bool = False
    query_corrections: bool = False
    architecture: str = "conv"
    patch_size: int = 16
    encoder_depth: int = 12
    encoder_width: int = 768
    decoder_width: int = 768
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field's type and range (TypeError or ValueError naming the field) before
        anything is built."""
        for name in (
            "widths",
            "attention_stages",
        ):  # lists (from JSON or a caller) are kept as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, (low, high) in INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        _check_ints("widths", self.widths, *WIDTH_RANGE, MAX_STAGES)
        _check_ints("attention_stages", self.attention_stages, 0, MAX_STAGES - 1, MAX_STAGES)
        if len(set(self.attention_stages)) != len(self.attention_stages):
            raise ValueError(
                f"attention_stages must not repeat a stage, got {list(self.attention_stages)}"
            )
        ratio = self.mlp_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not math.isfinite(ratio)
        ):
            raise ValueError(f"mlp_ratio must be a finite number, got {ratio!r}"[:200])
        if not MLP_RATIO_RANGE[0] < ratio <= MLP_RATIO_RANGE[1]:
            raise ValueError(
                f"mlp_ratio must lie in ({MLP_RATIO_RANGE[0]:g}, {MLP_RATIO_RANGE[1]:g}], got "
                f"{ratio:g}"
            )
        for name in ("label_propagation", "sparse_unknown", "query_corrections"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}"[:200])
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a mapping, got {type(self.extra).__name__}")
        if self.architecture != "conv":
            check_vit_config(self)
            return
        if self.resolution % (2 ** len(self.widths)) != 0:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {2 ** len(self.widths)}"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.label_propagation and self.bottleneck_tokens > 0:
            raise ValueError(
                "label_propagation needs every prompt token; set label_propagation to false to use "
                "bottleneck_tokens"
            )
        for stage in self.attention_stages:
            if not 0 <= stage < len(self.widths):
                raise ValueError(
                    f"attention_stages: stage {stage} outside 0..{len(self.widths) - 1}"
                )
            if self.widths[stage] % self.head_dim != 0:
                raise ValueError(
                    f"width {self.widths[stage]} is not a multiple of head_dim {self.head_dim}"
                )
            if int(self.widths[stage] * ratio) < 1:
                raise ValueError(
                    f"mlp_ratio {ratio:g} leaves no hidden units at width {self.widths[stage]}"
                )

    @property
    def encoding_entries(self) -> tuple[str, ...]:
        """Names of the cached (k, v) pairs of one attention stage: its blocks, then the
        propagation."""
        blocks = tuple(f"b{block}" for block in range(self.attention_depth))
        return blocks + (("propagation",) if self.label_propagation else ())

    def to_dict(self) -> dict[str, Any]:
        """Field values; ARCHITECTURE_FIELDS at their defaults are left out."""
        data = dataclasses.asdict(self)
        for name, default in ARCHITECTURE_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A config from a mapping of field values; ValueError on unknown keys or invalid values."""
        if not isinstance(data, dict):
            raise TypeError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("widths", "attention_stages"):
            if key in values:
                if not isinstance(values[key], (list, tuple)):
                    raise ValueError(f"{key} must be a list of integers, got {values[key]!r}"[:200])
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """A config from JSON text; ValueError on invalid JSON (also nesting too deep to parse) or
        values."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("model config JSON is nested too deeply") from None
        return cls.from_dict(data)


# Fields of the second architecture with their defaults (left out of ModelConfig.to_dict at these
# values) and the ranges of its integer fields.
ARCHITECTURE_FIELDS: dict[str, Any] = {
    "sparse_unknown": False,
    "query_corrections": False,
    "architecture": "conv",
    "patch_size": 16,
    "encoder_depth": 12,
    "encoder_width": 768,
    "decoder_width": 768,
}
VIT_INT_RANGES: dict[str, tuple[int, int]] = {
    "patch_size": (1, 256),
    "encoder_depth": (0, 64),
    "encoder_width": (1, 4096),
    "decoder_width": (1, 4096),
}


def check_vit_config(config: ModelConfig) -> None:
    """ValueError (TypeError for a non-integer) unless `config` describes a valid "vit" model."""
    if config.architecture != "vit":
        raise ValueError(f"architecture must be 'conv' or 'vit', got {config.architecture!r}"[:200])
    for name, (low, high) in VIT_INT_RANGES.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}"[:200])
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in {low}..{high}, got {value}")
    if config.in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {config.in_channels}")
    if config.resolution % config.patch_size != 0:
        raise ValueError(
            f"resolution {config.resolution} must be a multiple of patch_size {config.patch_size}"
        )
    if config.label_propagation:
        raise ValueError(
            "architecture vit has no label propagation; set label_propagation to false"
        )
    if config.query_corrections:
        raise ValueError("architecture vit takes no query corrections; set query_corrections false")
    for name in ("encoder_width", "decoder_width"):
        width = getattr(config, name)
        if width % config.head_dim != 0:
            raise ValueError(f"{name} {width} is not a multiple of head_dim {config.head_dim}")
        if int(width * config.mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio {config.mlp_ratio:g} leaves no hidden units at {name} {width}"
            )
