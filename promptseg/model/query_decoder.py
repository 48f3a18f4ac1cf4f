"""Query side of the model: query images + a PromptEncoding -> full-resolution logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.config import ModelConfig
from promptseg.model.encoder import SharedEncoder
from promptseg.model.layers import ConvNormAct, ResidualBlock, sincos_position_encoding
from promptseg.model.prompt_encoder import PromptEncoding
from promptseg.model.propagation import probability_logit


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
    """queries (B, C, R, R) + PromptEncoding of G groups (B % G == 0) -> logits (B, R, R).

    With label propagation, each attention stage first propagates the prompt labels to the query
    tokens (H maps per stage, embedded into the stage features by a 1x1 convolution), and the
    head-averaged map of the first attention stage, upsampled to R, is added in logit space to the
    output with a learned gain: the network starts from label transfer and learns to refine it.
    """

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
        self.blocks = blocks
        self.propagations = propagations  # shared with the prompt encoder, one per attention stage
        widths = config.widths
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        full_width = max(widths[0] // 2, 8)
        self.full_resolution = UpBlock(widths[0], config.in_channels, full_width)
        self.head = nn.Conv2d(full_width, 1, 1)
        if propagations is not None:
            heads = [config.widths[s] // config.head_dim for s in config.attention_stages]
            self.prior_embeddings = nn.ModuleList(
                nn.Conv2d(h, config.widths[s], 1) for h, s in zip(heads, config.attention_stages)
            )
            self.prior_gain = nn.Parameter(torch.tensor(1.0))

    def attend(
        self, features: torch.Tensor, stage_index: int, prompts: PromptEncoding
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query features (B, C, h, w) attend to the prompt tokens of one stage.

        Returns the new features (B, C, h, w) and, with label propagation, the propagated label
        probabilities (B, H, h, w) (else None).
        """
        b, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        pos = sincos_position_encoding(h, w, c, features.device, features.dtype)
        lengths = prompts.key_lengths[stage_index]
        blocks = self.blocks[stage_index]
        prior = None
        if self.propagations is not None:
            k, v = prompts.keys[stage_index][len(blocks)], prompts.values[stage_index][len(blocks)]
            prior = self.propagations[stage_index](tokens, pos, k, v, lengths).reshape(b, -1, h, w)
            tokens = tokens + self.prior_embeddings[stage_index](prior * 2.0 - 1.0).flatten(2).transpose(1, 2)
        for block, k, v in zip(blocks, prompts.keys[stage_index], prompts.values[stage_index]):
            tokens = block(tokens, pos, k, v, lengths)
        return tokens.transpose(1, 2).reshape(b, c, h, w), prior

    def forward(self, queries: torch.Tensor, prompts: PromptEncoding) -> torch.Tensor:
        if queries.shape[0] % prompts.groups != 0:
            raise ValueError(f"{queries.shape[0]} queries cannot be split over {prompts.groups} prompt sets")
        return self.decode_features(self.query_features(queries), queries, prompts)

    def query_features(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """queries (B, C, R, R) -> the shared encoder's features of every stage, (B, widths[i], h_i, w_i).

        They do not depend on the prompts, so several prompt sets can decode one computation of them."""
        empty = torch.zeros_like(queries[:, 0])
        types = torch.full((queries.shape[0],), PROMPT_TYPES["query"], dtype=torch.long, device=queries.device)
        return self.encoder(queries, empty, types)

    def decode_features(self, features: list[torch.Tensor], queries: torch.Tensor, prompts: PromptEncoding) -> torch.Tensor:
        """`query_features` of queries (B, C, R, R), B a multiple of the G prompt groups -> logits (B, R, R)."""
        features = list(features)
        priors = []
        for index, stage in enumerate(self.config.attention_stages):
            features[stage], prior = self.attend(features[stage], index, prompts)
            priors.append(prior)
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        x = self.full_resolution(x, queries * 2.0 - 1.0)
        logits = self.head(x).squeeze(1)
        if self.propagations is not None:
            prior = F.interpolate(priors[0].mean(dim=1, keepdim=True), size=logits.shape[-2:], mode="bilinear",
                                  align_corners=False)
            logits = logits + self.prior_gain * probability_logit(prior.squeeze(1))
        return logits
