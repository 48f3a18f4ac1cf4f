"""PromptSegNet: shared encoder, prompt encoder (cacheable) and query decoder."""
from __future__ import annotations

import torch
from torch import nn

from promptseg.kernels import BACKENDS, check_backend_device
from promptseg.model.attention import QueryPromptBlock
from promptseg.model.config import ModelConfig
from promptseg.model.encoder import SharedEncoder
from promptseg.model.member_decoding import decode_member_groups
from promptseg.model.prompt_encoder import PromptEncoder, PromptEncoding
from promptseg.model.propagation import LabelPropagation
from promptseg.model.query_decoder import QueryDecoder
from promptseg.model.vit import build_vit


class PromptSegNet(nn.Module):
    """Universal segmentation by visual prompts.

    `encode_prompts` depends only on the prompts and its PromptEncoding is reused by `decode` for
    any number of queries; `forward` is the two in sequence.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        if self.config.architecture == "vit":  # the paper's design (promptseg.model.vit), same interface
            self.encoder, self.embedding, self.blocks, self.prompt_encoder, self.query_decoder = build_vit(self.config)
            self.propagations = None
            self.set_attention_backend("sdpa")
            return
        encoder = SharedEncoder(self.config)
        blocks = nn.ModuleList(
            nn.ModuleList(
                QueryPromptBlock(self.config.widths[s], self.config.head_dim, self.config.mlp_ratio)
                for _ in range(self.config.attention_depth)
            )
            for s in self.config.attention_stages
        )
        propagations = nn.ModuleList(
            LabelPropagation(self.config.widths[s], self.config.head_dim) for s in self.config.attention_stages
        ) if self.config.label_propagation else None
        self.encoder = encoder
        self.blocks = blocks
        self.propagations = propagations
        self.prompt_encoder = PromptEncoder(self.config, encoder, blocks, propagations)
        self.query_decoder = QueryDecoder(self.config, encoder, blocks, propagations)
        self.set_attention_backend("sdpa")

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    def set_attention_backend(self, backend: str) -> PromptSegNet:
        """Route every attention call through `backend` (reference, sdpa or triton): sets the string
        attribute `backend` of every sub-module that has one (Attention, LabelPropagation, ...).

        Raises PromptSegError (one line) when the backend cannot run where the model's parameters
        live (triton on a CPU model without TRITON_INTERPRET=1, or on a CUDA model under it): move
        the model to its device first.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        check_backend_device(backend, next(self.parameters()).device)
        self._attention_backend = backend
        for module in self.modules():
            if isinstance(getattr(module, "backend", None), str):
                module.backend = backend
        return self

    def check_prompts(self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> None:
        """Raise ValueError unless images (G, K, C, R, R), maps (G, K, R, R), types (G, K) agree."""
        if images.dim() != 5 or images.shape[2] != self.config.in_channels:
            raise ValueError(
                f"prompt images must be (G, K, {self.config.in_channels}, R, R), got {tuple(images.shape)}"
            )
        if maps.shape != images.shape[:2] + images.shape[3:] or types.shape != images.shape[:2]:
            raise ValueError(f"prompt maps {tuple(maps.shape)} / types {tuple(types.shape)} do not match images")
        if not 1 <= images.shape[1] <= self.config.max_prompts:
            raise ValueError(f"between 1 and {self.config.max_prompts} prompts are supported, got {images.shape[1]}")

    def encode_prompts(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> PromptEncoding:
        """images (G, K, C, R, R), maps (G, K, R, R), types (G, K) long; num_prompts (G,) marks
        groups padded past their own prompt count. Returns the cacheable PromptEncoding."""
        self.check_prompts(images, maps, types)
        return self.prompt_encoder(images, maps, types, num_prompts)

    def decode(self, queries: torch.Tensor, prompts: PromptEncoding) -> torch.Tensor:
        """queries (B, C, R, R) with B a multiple of G -> logits (B, R, R); query b uses group b // (B // G)."""
        return self.query_decoder(queries, prompts)

    def decode_members(
        self, queries: torch.Tensor, prompts: PromptEncoding, features: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Every query against every one of the G prompt groups (ensemble members), in one batch:
        queries (B, C, R, R) -> logits (G, B, R, R). The query encoder runs once for the B queries
        (or not at all when their `query_features` are given), and the convolutional decoder shares
        the skip connections' convolutions between the members (promptseg.model.member_decoding)."""
        groups, count = prompts.groups, queries.shape[0]
        if not hasattr(self.query_decoder, "query_features"):  # a decoder that cannot share them decodes all
            logits = self.query_decoder(queries.repeat(groups, 1, 1, 1), prompts)  # query b of group g at g * B + b
            return logits.reshape(groups, count, *logits.shape[1:])
        features = self.query_decoder.query_features(queries) if features is None else features
        if isinstance(self.query_decoder, QueryDecoder):
            return decode_member_groups(self.query_decoder, features, queries, prompts)
        repeated = [f.repeat(groups, 1, 1, 1) for f in features]
        logits = self.query_decoder.decode_features(repeated, queries.repeat(groups, 1, 1, 1), prompts)
        return logits.reshape(groups, count, *logits.shape[1:])

    def forward(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        queries: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt sets (G, K, ...) and queries (B, C, R, R) -> logits (B, R, R)."""
        return self.decode(queries, self.encode_prompts(images, maps, types, num_prompts))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
