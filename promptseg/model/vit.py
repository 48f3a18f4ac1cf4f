"""The PromptSeg paper's architecture (ModelConfig.architecture "vit") on the engine's kernels and
cache.

A ViT image encoder turns every image (prompt or query) of R x R pixels into n = (R / p) ** 2 patch
tokens; a prompt pair adds its image tokens and n tokens of its prompt map (patch embedding plus the
prompt type), so a group of K prompts is a sequence of K * 2n prompt tokens, prompt-major. A
GPT-2-style pre-norm transformer (attention_depth layers of decoder_width) runs over the prompt
tokens followed by the query's n tokens, under a mask in which prompt tokens attend only to prompt
tokens and query tokens attend to every prompt token and to their own query's tokens. Prompt keys
and values of every layer therefore depend on the prompts alone: `PromptSegViT.prompt_encoding`
computes them once into a PromptEncoding (one stage; entry b{l} per layer l, (G, H, K * 2n, D)), and
`PromptSegViT.decode_features` runs only the query tokens, each layer through
`promptseg.kernels.cross_attention` with the prompt keys as the shared group and the query's own
tokens as own_k / own_v.

With bottleneck_tokens M > 0 (the Entropy paper's information bottleneck), M learned latent tokens
sit between the two: latents attend to the prompt tokens and to themselves, query tokens attend to
the latents and to themselves only, and the encoding holds the latents' keys and values (G, H, M,
D). `promptseg.model.vit_reference` writes out the same model as one masked full-sequence
transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from promptseg.model.attention import MLP, Attention
from promptseg.model.config import ModelConfig
from promptseg.model.encoding import PromptEncoding
from promptseg.model.layers import sincos_position_encoding
from promptseg.model.network import PromptSegNet

# Rows of TokenEmbedding.roles.
ROLE_PROMPT_IMAGE, ROLE_PROMPT_MAP, ROLE_QUERY = 0, 1, 2


class TransformerBlock(nn.Module):
    """GPT-2-style pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)). Tokens (N, T, C).

    Keys and values come from the same normed tokens as the queries, so a block's keys of some
    tokens are `project(x)` wherever those tokens are attended from.
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = Attention(dim, head_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, T, C) -> normed tokens (N, T, C) and their keys, values (N, H, T, D)."""
        h = self.norm_attention(x)
        k, v = self.attention.project_keys(h, h)
        return h, k, v

    def self_step(
        self, x: torch.Tensor, key_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Tokens attend among themselves: x (N, T, C), key_lengths (N,) valid tokens or None
        -> (new x (N, T, C), this layer's k, v (N, H, T, D))."""
        h, k, v = self.project(x)
        x = x + self.attention(h, k, v, key_lengths)
        return x + self.mlp(self.norm_mlp(x)), k, v

    def joint_step(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """Tokens x (B, T, C) attend to the group keys k, v (G, H, Nk, D) (key_lengths (G,) or None)
        and to themselves, in one softmax -> (new x (B, T, C), their own k, v (B, H, T, D))."""
        h, own_k, own_v = self.project(x)
        x = x + self.attention(h, k, v, key_lengths, own_k=own_k, own_v=own_v)
        return x + self.mlp(self.norm_mlp(x)), own_k, own_v


class ViTEncoder(nn.Module):
    """Plain ViT: images (N, C, R, R) in [0, 1] -> patch features (N, encoder_width, R / p, R / p).

    Patch embedding, fixed 2D sine-cosine positions, encoder_depth pre-norm blocks of global
    self-attention (each image alone, through cross_attention with one group per image), LayerNorm.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width, patch = config.encoder_width, config.patch_size
        self.patch_embedding = nn.Conv2d(config.in_channels, width, patch, stride=patch)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.head_dim, config.mlp_ratio)
            for _ in range(config.encoder_depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images * 2.0 - 1.0)
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + sincos_position_encoding(h, w, c, x.device, x.dtype)
        for block in self.blocks:
            x = block.self_step(x)[0]
        return self.norm(x).transpose(1, 2).reshape(n, c, h, w)


class TokenEmbedding(nn.Module):
    """Decoder input tokens (width decoder_width) from encoder features and prompt maps.

    Image tokens: a linear map of the encoder's patch features; map tokens: a patch embedding of the
    map plus its prompt type. Both get the patch's sine-cosine position and a learned role
    (prompt image, prompt map, query image).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.decoder_width
        self.image_projection = nn.Linear(config.encoder_width, width)
        self.map_embedding = nn.Conv2d(1, width, config.patch_size, stride=config.patch_size)
        self.type_embedding = nn.Embedding(config.num_prompt_types, width)
        self.roles = nn.Embedding(3, width)
        for embedding in (self.type_embedding, self.roles):
            nn.init.normal_(embedding.weight, std=0.02)

    def position(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h * w, decoder_width) sine-cosine positions in like's dtype and device."""
        return sincos_position_encoding(h, w, self.roles.embedding_dim, like.device, like.dtype)

    def images(self, features: torch.Tensor, role: int) -> torch.Tensor:
        """features (N, encoder_width, h, w) -> tokens (N, h * w, decoder_width)."""
        _, _, h, w = features.shape
        tokens = self.image_projection(features.flatten(2).transpose(1, 2))
        return tokens + self.position(h, w, tokens) + self.roles.weight[role]

    def maps(self, maps: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """maps (N, R, R) in [0, 1], types (N,) long -> tokens (N, n, decoder_width)."""
        x = self.map_embedding(maps.unsqueeze(1) * 2.0 - 1.0)
        _, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.type_embedding(types)[:, None, :]
        return tokens + self.position(h, w, tokens) + self.roles.weight[ROLE_PROMPT_MAP]

    def prompts(
        self, encoder: ViTEncoder, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> torch.Tensor:
        """images (G, K, C, R, R), maps (G, K, R, R), types (G, K) -> prompt tokens (G, K * 2n, C),
        prompt-major: prompt k's n image tokens, then its n map tokens."""
        groups = images.shape[0]
        image_tokens = self.images(encoder(images.flatten(0, 1)), ROLE_PROMPT_IMAGE)
        map_tokens = self.maps(maps.flatten(0, 1).to(image_tokens.dtype), types.flatten())
        pairs = torch.cat([image_tokens, map_tokens], dim=1)  # (G * K, 2n, C)
        return pairs.reshape(groups, -1, pairs.shape[-1])


class ViTLatents(nn.Module):
    """The prompt side's own parameters: with an information bottleneck, the M learned latents
    (M, decoder_width) that distil the prompt tokens at every layer; else none."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.latents = None
        if config.bottleneck_tokens > 0:
            self.latents = nn.Parameter(
                torch.randn(config.bottleneck_tokens, config.decoder_width) * 0.02
            )


class PatchHead(nn.Module):
    """The query side's own parameters: a final LayerNorm and a per-patch linear head.

    forward: final query tokens (B, n, C) and the resolution R -> logits (B, R, R), each token
    giving its p x p patch.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.norm = nn.LayerNorm(config.decoder_width)
        self.head = nn.Linear(config.decoder_width, config.patch_size**2)

    def forward(self, tokens: torch.Tensor, resolution: int) -> torch.Tensor:
        p = self.patch_size
        side = resolution // p
        patches = self.head(self.norm(tokens)).reshape(-1, side, side, p, p)
        return patches.permute(0, 1, 3, 2, 4).reshape(-1, side * p, side * p)


class PromptSegViT(PromptSegNet):
    """The paper's design behind PromptSegNet's interface (built by PromptSegNet(config) when
    config.architecture is "vit"): the ViT encoder embeds every image, then decoder layers run over
    prompt tokens (attending among themselves) and query tokens (attending to every prompt token and
    to themselves), so the prompt side of every layer is cached in one PromptEncoding stage."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.encoder = ViTEncoder(config)
        self.embedding = TokenEmbedding(config)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.decoder_width, config.head_dim, config.mlp_ratio)
            for _ in range(config.attention_depth)
        )
        self.propagations = None
        self.prompt_encoder = ViTLatents(config)
        self.query_decoder = PatchHead(config)
        self.set_attention_kernel("sdpa")

    def prompt_encoding(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> PromptEncoding:
        """(G, K, C, R, R) images, (G, K, R, R) maps, (G, K) types, optional (G,) prompt counts
        -> PromptEncoding with one stage whose entry l holds layer l's keys and values of the prompt
        tokens (G, H, K * 2n, D), or of the M latents (G, H, M, D) with a bottleneck."""
        x = self.embedding.prompts(self.encoder, images, maps, types)
        per_prompt = x.shape[1] // images.shape[1]
        lengths = None if num_prompts is None else num_prompts.to(x.device) * per_prompt
        latents = self.prompt_encoder.latents
        latents = None if latents is None else latents.to(x.dtype).expand(x.shape[0], -1, -1)
        keys = []
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            if latents is None and layer == last:  # the prompt tokens' output is never read
                keys.append(block.project(x)[1:])
                continue
            x, k, v = block.self_step(x, lengths)
            if latents is not None:
                latents, k, v = block.joint_step(latents, k, v, lengths)
            keys.append((k, v))
        return PromptEncoding(
            [[k for k, _ in keys]], [[v for _, v in keys]], [lengths if latents is None else None]
        )

    def query_features(
        self, queries: torch.Tensor, corrections: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """queries (B, C, R, R) -> [encoder features (B, encoder_width, R / p, R / p)]; they do not
        depend on the prompts, so several prompt sets can decode one computation of them. This
        design takes no corrections (ValueError when given)."""
        if corrections is not None:
            raise ValueError("the vit architecture takes no correction maps")
        return [self.encoder(queries)]

    def decode_features(
        self,
        features: list[torch.Tensor],
        queries: torch.Tensor,
        prompts: PromptEncoding,
        corrections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`query_features` of queries (B, C, R, R), B a multiple of the G prompt groups -> logits
        (B, R, R).

        Each query's n tokens run through every layer against that layer's cached prompt (or latent)
        keys and values plus their own. This design takes no corrections (`query_features` refuses
        them)."""
        x = self.embedding.images(features[-1], ROLE_QUERY)
        lengths = prompts.key_lengths[0]
        for block, k, v in zip(self.blocks, prompts.keys[0], prompts.values[0]):
            x = block.joint_step(x, k, v, lengths)[0]
        return self.query_decoder(x, queries.shape[-1])

    def decode_members(
        self,
        queries: torch.Tensor,
        prompts: PromptEncoding,
        features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Every query against every one of the G prompt groups: queries (B, C, R, R) -> logits
        (G, B, R, R), the query's ViT encoding computed once (or taken from `features`)."""
        groups, count = prompts.groups, queries.shape[0]
        features = self.query_features(queries) if features is None else features
        repeated = [f.repeat(groups, 1, 1, 1) for f in features]
        logits = self.decode_features(repeated, queries.repeat(groups, 1, 1, 1), prompts)
        return logits.reshape(groups, count, *logits.shape[1:])
