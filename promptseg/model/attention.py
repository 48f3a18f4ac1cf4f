"""Transformer blocks in which query tokens attend to themselves and to prompt tokens.

Every attention call goes through `promptseg.kernels.cross_attention`, so the kernel (reference,
SDPA, Triton) is one setting and nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn

from promptseg.kernels import cross_attention


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(N, T, H * D) -> (N, H, T, D)."""
    n, t, c = x.shape
    return x.reshape(n, t, c // head_dim, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, H, T, D) -> (N, T, H * D)."""
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


class Attention(nn.Module):
    """Multi-head attention whose keys/values may be precomputed (the prompt cache).

    `kernel` names the `cross_attention` kernel (set for the whole model by
    PromptSegNet.set_attention_kernel).

    `project_keys` maps context tokens (G, Nk, C) to k, v (G, H, Nk, D); `forward` attends queries
    x (B, Nq, C) with B a multiple of G to them (and, given own_k, own_v (B, H, Ns, D), to each
    query's own keys in the same softmax) and returns (B, Nq, C).
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.kernel = "sdpa"
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def project_keys(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (G, Nk, C) -> k, v (G, H, Nk, D)."""
        return split_heads(self.k_proj(keys), self.head_dim), split_heads(
            self.v_proj(values), self.head_dim
        )

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_lengths: torch.Tensor | None = None,
        own_k: torch.Tensor | None = None,
        own_v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.head_dim)
        out = cross_attention(
            q, k, v, key_lengths=key_lengths, kernel=self.kernel, own_k=own_k, own_v=own_v
        )
        return self.out_proj(merge_heads(out))


class MLP(nn.Sequential):
    """(…, C) -> (…, C) two-layer GELU MLP."""

    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class QueryPromptBlock(nn.Module):
    """Pre-norm block: self-attention over query tokens, cross-attention to prompt tokens, MLP.

    x (B, N, C) query tokens, pos (N, C) positional encoding; the prompt side is given as
    precomputed k, v (G, H, Nk, D) from `prompt_keys`.
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = Attention(dim, head_dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attention = Attention(dim, head_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def prompt_keys(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens (G, Nk, C) -> this block's k, v (G, H, Nk, D); depends only on the
        prompts."""
        return self.cross_attention.project_keys(keys, values)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        prompt_k: torch.Tensor,
        prompt_v: torch.Tensor,
        key_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        normed = self.norm_self(x)
        h = normed + pos
        k, v = self.self_attention.project_keys(h, normed)
        x = x + self.self_attention(h, k, v)
        x = x + self.cross_attention(self.norm_cross(x) + pos, prompt_k, prompt_v, key_lengths)
        return x + self.mlp(self.norm_mlp(x))


class PromptBottleneck(nn.Module):
    """Information bottleneck: M learned latents attend to the prompt tokens of each group.

    keys, values (G, Nk, C) with key_lengths (G,) -> latent tokens (G, M, C), used as keys and
    values.
    """

    def __init__(self, dim: int, head_dim: int, tokens: int, mlp_ratio: float) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.attention = Attention(dim, head_dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(
        self, keys: torch.Tensor, values: torch.Tensor, key_lengths: torch.Tensor | None
    ) -> torch.Tensor:
        groups = keys.shape[0]
        latents = self.latents.unsqueeze(0).expand(groups, -1, -1)
        k, v = self.attention.project_keys(keys, values)
        latents = latents + self.attention(latents, k, v, key_lengths)
        return latents + self.mlp(self.norm(latents))
