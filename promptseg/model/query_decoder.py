"""Query side of the model: query images + a PromptEncoding -> full-resolution logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.data.prompts import PROMPT_TYPES
from promptseg.model.config import ModelConfig
from promptseg.model.encoder import SharedEncoder
from promptseg.model.layers import ConvNormAct, ResidualBlock, sincos_position_encoding
from promptseg.model.prompt_encoder import PromptEncoding


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, fuse: (N, C_in, h, w) + (N, C_skip, 2h, 2w) -> (N, C_out, 2h, 2w)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fuse = ConvNormAct(in_channels + skip_channels, out_channels)
        self.refine = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(self.fuse(torch.cat([x, skip], dim=1)))


class QueryDecoder(nn.Module):
    """queries (B, C, R, R) + PromptEncoding of G groups (B % G == 0) -> logits (B, R, R)."""

    def __init__(self, config: ModelConfig, encoder: SharedEncoder, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.blocks = blocks
        widths = config.widths
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        full_width = max(widths[0] // 2, 8)
        self.full_resolution = UpBlock(widths[0], config.in_channels, full_width)
        self.head = nn.Conv2d(full_width, 1, 1)

    def attend(self, features: torch.Tensor, stage_index: int, prompts: PromptEncoding) -> torch.Tensor:
        """Query features (B, C, h, w) attend to the prompt tokens of one stage; same shape out."""
        b, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        pos = sincos_position_encoding(h, w, c, features.device, features.dtype)
        lengths = prompts.key_lengths[stage_index]
        for block, k, v in zip(self.blocks[stage_index], prompts.keys[stage_index], prompts.values[stage_index]):
            tokens = block(tokens, pos, k, v, lengths)
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, queries: torch.Tensor, prompts: PromptEncoding) -> torch.Tensor:
        if queries.shape[0] % prompts.groups != 0:
            raise ValueError(f"{queries.shape[0]} queries cannot be split over {prompts.groups} prompt sets")
        empty = torch.zeros_like(queries[:, 0])
        types = torch.full((queries.shape[0],), PROMPT_TYPES["query"], dtype=torch.long, device=queries.device)
        features = self.encoder(queries, empty, types)
        for index, stage in enumerate(self.config.attention_stages):
            features[stage] = self.attend(features[stage], index, prompts)
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        x = self.full_resolution(x, queries * 2.0 - 1.0)
        return self.head(x).squeeze(1)
