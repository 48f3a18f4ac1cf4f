"""Prompt side of the model: prompt pairs -> per-block keys and values (the cacheable part)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.attention import PromptBottleneck
from promptseg.model.config import ModelConfig
from promptseg.model.encoder import SharedEncoder
from promptseg.model.layers import sincos_position_encoding
from promptseg.model.propagation import propagation_labels


@dataclass
class PromptEncoding:
    """Everything the query decoder needs from a batch of G prompt sets.

    keys[s][e], values[s][e]: (G, H, Nk_s, D) for attention stage s and entry e, where the entries
    are the stage's blocks followed, with label propagation, by the propagation pair
    (ModelConfig.encoding_entries);
    key_lengths[s]: (G,) long valid keys per group, or None when every group is full.
    """

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    key_lengths: list[torch.Tensor | None]

    @property
    def groups(self) -> int:
        return self.keys[0][0].shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEncoding:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        return PromptEncoding(
            [[move(t) for t in stage] for stage in self.keys],
            [[move(t) for t in stage] for stage in self.values],
            [None if n is None else n.to(device) for n in self.key_lengths],
        )

    def nbytes(self) -> int:
        tensors = [t for stage in self.keys + self.values for t in stage]
        return sum(t.numel() * t.element_size() for t in tensors)


class PromptTokenizer(nn.Module):
    """Turns encoder features of prompt pairs into prompt tokens at one attention stage.

    key_features (G*K, C, h, w) come from the image alone (as a query would be encoded), so keys
    compare like with like; value_features (G*K, C, h, w) come from image + prompt map, and the
    map pooled to the stage grid is embedded into the values explicitly; pos (h*w, C) is the
    stage's positional encoding, added to the keys.
    Returns keys, values (G, K*h*w, C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.key_norm = nn.LayerNorm(dim)
        self.value_norm = nn.LayerNorm(dim)
        self.map_embedding = nn.Linear(1, dim)

    def forward(
        self,
        key_features: torch.Tensor,
        value_features: torch.Tensor,
        maps: torch.Tensor,
        pos: torch.Tensor,
        groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = key_features.shape
        pooled = F.adaptive_avg_pool2d(maps.unsqueeze(1).to(value_features.dtype), (h, w))
        keys = self.key_norm(key_features.flatten(2).transpose(1, 2)) + pos
        values = self.value_norm(value_features.flatten(2).transpose(1, 2))
        values = values + self.map_embedding(pooled.flatten(2).transpose(1, 2) * 2.0 - 1.0)
        return keys.reshape(groups, -1, c), values.reshape(groups, -1, c)


class PromptEncoder(nn.Module):
    """(G, K, C, R, R) images, (G, K, R, R) maps, (G, K) types, optional (G,) prompt counts
    -> PromptEncoding for the blocks of `blocks` (the query decoder's attention blocks)."""

    def __init__(
        self,
        config: ModelConfig,
        encoder: SharedEncoder,
        blocks: nn.ModuleList,
        propagations: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.blocks = blocks  # shared with the query decoder: ModuleList of per-stage ModuleLists
        self.propagations = propagations  # shared with the query decoder: one LabelPropagation per stage
        self.tokenizers = nn.ModuleList(PromptTokenizer(config.widths[s]) for s in config.attention_stages)
        self.bottlenecks = nn.ModuleList(
            PromptBottleneck(config.widths[s], config.head_dim, config.bottleneck_tokens, config.mlp_ratio)
            for s in config.attention_stages
        ) if config.bottleneck_tokens > 0 else None

    def forward(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> PromptEncoding:
        groups, shots = images.shape[:2]
        flat_images = images.flatten(0, 1)
        flat_maps = maps.flatten(0, 1)
        query_types = torch.full_like(types.flatten(), PROMPT_TYPES["query"])
        both = self.encoder(
            torch.cat([flat_images, flat_images]),
            torch.cat([torch.zeros_like(flat_maps), flat_maps]),
            torch.cat([query_types, types.flatten()]),
        )
        all_keys, all_values, all_lengths = [], [], []
        for index, stage in enumerate(self.config.attention_stages):
            # Slices rather than chunk(2): torch.export cannot prove chunk's output count constant
            # in K and would specialise the exported graphs to the example K.
            count = flat_images.shape[0]
            key_features, value_features = both[stage][:count], both[stage][count:]
            _, c, h, w = key_features.shape
            pos = sincos_position_encoding(h, w, c, key_features.device, key_features.dtype)
            keys, values = self.tokenizers[index](key_features, value_features, flat_maps, pos, groups)
            tokens_per_prompt = keys.shape[1] // shots
            lengths = None if num_prompts is None else num_prompts.to(keys.device) * tokens_per_prompt
            if self.bottlenecks is not None:
                keys = values = self.bottlenecks[index](keys, values, lengths)
                lengths = None
            pairs = [block.prompt_keys(keys, values) for block in self.blocks[index]]
            if self.propagations is not None:
                tokens = key_features.flatten(2).transpose(1, 2)
                labels = propagation_labels(flat_maps.to(tokens.dtype), types.flatten(), (h, w),
                                            self.config.sparse_unknown)
                pairs.append(self.propagations[index].prompt_keys(tokens, pos, labels, groups))
            all_keys.append([k for k, _ in pairs])
            all_values.append([v for _, v in pairs])
            all_lengths.append(lengths)
        return PromptEncoding(all_keys, all_values, all_lengths)
