"""The model as two exportable graphs: prompt encoder and query decoder.

A PromptEncoding is a nested list of tensors; exporters and runtimes need a flat tuple with
stable names. With one prompt set (G = 1) and every prompt valid, key_lengths is None and the
encoding is fully described by its keys and values, so:

    PromptEncoderGraph:  prompt_images (1, K, C, R, R), prompt_maps (1, K, R, R), prompt_types (1,
    K) int64
                         -> keys_s{i}_{e}, values_s{i}_{e}: (1, H, K * n_i, D) each
    QueryDecoderGraph:   queries (B, C, R, R), keys_s{i}_{e}, values_s{i}_{e}, ... -> logits (B, R,
    R)

where i runs over attention stages, e over the entries of a stage (ModelConfig.encoding_entries:
blocks b0, b1, ..., then `propagation` for models with label propagation) and n_i is the number
of tokens one prompt contributes at stage i. Both are dynamic in K; the decoder is dynamic in B.
A "vit" model has one stage (i = 0) whose entries are its transformer layers, with n_0 = 2 (R / p)
** 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptseg.model import ModelConfig, PromptEncoding, PromptSegNet

PROMPT_INPUT_NAMES = ("prompt_images", "prompt_maps", "prompt_types")
QUERY_INPUT_NAME = "queries"
LOGITS_NAME = "logits"
GRAPH_ROLES = ("prompt_encoder", "query_decoder")
ENCODING_KINDS = ("keys", "values")


def graph_path(folder: str | os.PathLike, role: str) -> Path:
    """Where export_onnx writes (and runtimes look for) the graph `role`: folder/role.onnx."""
    return Path(folder) / f"{role}.onnx"


def graph_paths(folder: str | os.PathLike) -> dict[str, Path]:
    """`graph_path` of both graphs: {role: folder/role.onnx} in GRAPH_ROLES order."""
    return {role: graph_path(folder, role) for role in GRAPH_ROLES}


def stage_widths(config: ModelConfig) -> list[int]:
    """Channel width H * D of the encoding tensors of each attention-stage index i: widths[s_i] for
    the conv design's stages s_i, [decoder_width] for a "vit" model (one stage)."""
    if config.architecture == "vit":
        return [config.decoder_width]
    return [config.widths[stage] for stage in config.attention_stages]


def encoding_names(config: ModelConfig) -> list[str]:
    """Names of the flattened PromptEncoding tensors, keys then values, stage-major."""
    stages = range(len(stage_widths(config)))
    return [
        f"{kind}_s{s}_{entry}"
        for kind in ENCODING_KINDS
        for s in stages
        for entry in config.encoding_entries
    ]


def encoding_stages(config: ModelConfig) -> list[int]:
    """Attention-stage index i (into config.attention_stages) of each tensor, in `encoding_names`
    order."""
    stages = range(len(stage_widths(config)))
    return [s for _kind in ENCODING_KINDS for s in stages for _entry in config.encoding_entries]


def tokens_per_prompt(config: ModelConfig) -> list[int | None]:
    """n_i per attention-stage index i: the encoding tokens one prompt adds, (R / 2 ** (s_i + 1)) **
    2 for stage s_i of stride 2 ** (s_i + 1), 2 (R / patch_size) ** 2 (image and map tokens) for a
    "vit" model; None with a prompt bottleneck, whose count is fixed (bottleneck_tokens) whatever K
    is."""
    if config.bottleneck_tokens > 0:
        return [None] * len(stage_widths(config))
    if config.architecture == "vit":
        return [2 * (config.resolution // config.patch_size) ** 2]
    return [(config.resolution // 2 ** (stage + 1)) ** 2 for stage in config.attention_stages]


def config_differences(exported: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Sorted keys whose values differ between two model configs as JSON dicts (missing keys
    count)."""
    return sorted(
        key for key in exported.keys() | current.keys() if exported.get(key) != current.get(key)
    )


def flatten_encoding(encoding: PromptEncoding) -> tuple[torch.Tensor, ...]:
    """PromptEncoding -> tuple ordered as `encoding_names`; only full, single-set encodings."""
    if any(n is not None for n in encoding.key_lengths):
        raise ValueError("only encodings without key_lengths (every prompt valid) can be flattened")
    return tuple(t for stage in encoding.keys for t in stage) + tuple(
        t for stage in encoding.values for t in stage
    )


def unflatten_encoding(tensors: Sequence[torch.Tensor], config: ModelConfig) -> PromptEncoding:
    """Inverse of `flatten_encoding` for a model with `config`."""
    stages, depth = len(stage_widths(config)), len(config.encoding_entries)
    if len(tensors) != 2 * stages * depth:
        raise ValueError(f"expected {2 * stages * depth} encoding tensors, got {len(tensors)}")
    half = stages * depth
    keys = [list(tensors[s * depth : (s + 1) * depth]) for s in range(stages)]
    values = [list(tensors[half + s * depth : half + (s + 1) * depth]) for s in range(stages)]
    return PromptEncoding(keys, values, [None] * stages)


class PromptEncoderGraph(nn.Module):
    """(1, K, C, R, R) images, (1, K, R, R) maps, (1, K) types -> flat encoding tuple."""

    def __init__(self, model: PromptSegNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, prompt_images: torch.Tensor, prompt_maps: torch.Tensor, prompt_types: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return flatten_encoding(
            self.model.prompt_encoding(prompt_images, prompt_maps, prompt_types)
        )


class QueryDecoderGraph(nn.Module):
    """(B, C, R, R) queries + flat encoding tensors -> (B, R, R) logits."""

    def __init__(self, model: PromptSegNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries: torch.Tensor, *encoding: torch.Tensor) -> torch.Tensor:
        return self.model.decode(queries, unflatten_encoding(encoding, self.model.config))


def example_inputs(
    config: ModelConfig, shots: int = 2, batch: int = 2
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random float32 example inputs for tracing: ((images, maps, types), queries)."""
    r, c = config.resolution, config.in_channels
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, shots, c, r, r, generator=generator)
    maps = (torch.rand(1, shots, r, r, generator=generator) > 0.5).float()
    types = torch.ones(1, shots, dtype=torch.long)
    queries = torch.rand(batch, c, r, r, generator=generator)
    return (images, maps, types), queries
