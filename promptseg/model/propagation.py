"""Label propagation: each query token takes the prompt label of the prompt tokens it resembles.

A non-parametric prior in the spirit of nearest-neighbour label transfer, built into the model so
that the prompts steer the prediction from the first training step. Query and prompt image tokens
are normalised, shifted by the 2D positional encoding and projected by one shared matrix into H
heads; cosine similarity times a learned temperature is softmax-normalised over all prompt tokens
of the group, and the values are the fraction of prompt label inside each prompt token. Head h
thus returns a probability map p_h in [0, 1] for every query token.

A mask or box prompt labels every prompt token: its value is the token's label fraction (a box
says that nothing outside it is target). A click or scribble labels only the tokens it touches,
and says nothing about the rest: with ModelConfig.sparse_unknown those tokens carry 1 where the
prompt touches them and the uninformative 0.5 elsewhere (`propagation_labels`), so a query token
that resembles none of the clicked tokens gets a neutral prior instead of a confident
"background"; without it (the shipped weights) they carry their label fraction like a mask.

The prompt side (k, v) depends only on the prompts and is cached with the rest of the
PromptEncoding; the value tensor carries the label fraction in channel 0 and zeros elsewhere so
that it has the shape of the attention contract (docs/design.md section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.kernels import cross_attention
from promptseg.model.attention import split_heads
from promptseg.model.prompt_types import PROMPT_TYPES


def float32_under_autocast(
    function: Callable[..., Any], *tensors: torch.Tensor, **rest: Any
) -> Any:
    """function(*tensors, **rest); while autocast is on for the tensors' device (bf16 training),
    with autocast switched off and the tensors in float32, so the prior keeps its precision."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return function(*tensors, **rest)
    with torch.autocast(device_type, enabled=False):
        return function(*(t.float() for t in tensors), **rest)


PARTIAL_LABEL_TYPES: tuple[str, ...] = ("click", "scribble")


def propagation_labels(
    maps: torch.Tensor, types: torch.Tensor, size: tuple[int, int], sparse_unknown: bool = True
) -> torch.Tensor:
    """Prompt maps (N, R, R) in [0, 1], prompt types (N,) long -> per-token labels (N, h*w) in [0,
    1] on the (h, w) = `size` token grid (R a multiple of h and w).

    Mask and box prompts: the fraction of the token's pixels inside the map. Clicks and scribbles
    (PARTIAL_LABEL_TYPES) with `sparse_unknown`: 1 where the map touches the token, 0.5 (unknown)
    elsewhere; without it, their fraction like a mask.
    """
    stride = (maps.shape[-2] // size[0], maps.shape[-1] // size[1])
    maps = maps.unsqueeze(1)
    fraction = F.avg_pool2d(maps, stride).flatten(1)
    if not sparse_unknown:
        return fraction
    touched = F.max_pool2d(maps, stride).flatten(1)
    partial = torch.zeros_like(types, dtype=torch.bool)
    for name in PARTIAL_LABEL_TYPES:
        partial = partial | (types == PROMPT_TYPES[name])
    return torch.where(partial[:, None], 0.5 + 0.5 * touched, fraction)


class LabelPropagation(nn.Module):
    """Attention of query tokens to prompt tokens whose values are the prompt label fractions.

    dim C tokens, H = C / head_dim heads of width D = head_dim. Under autocast (bf16 training) the
    layer runs in float32: its logits reach +-150, where bf16 keeps less than one unit of
    resolution.
    """

    def __init__(self, dim: int, head_dim: int, temperature: float = 150.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.kernel = "sdpa"
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (N, T, C), pos (T, C) -> unit vectors (N, H, T, D)."""
        return F.normalize(
            split_heads(self.projection(self.norm(tokens) + pos), self.head_dim), dim=-1
        )

    def prompt_keys(
        self, tokens: torch.Tensor, pos: torch.Tensor, token_labels: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt image tokens (G*K, T, C), pos (T, C), per-token labels (G*K, T) in [0, 1]
        (`propagation_labels`) -> k, v (G, H, K*T, D) float32 under autocast; v holds the label
        in channel 0."""
        return float32_under_autocast(self._prompt_keys, tokens, pos, token_labels, groups=groups)

    def _prompt_keys(
        self, tokens: torch.Tensor, pos: torch.Tensor, token_labels: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.embed(tokens, pos)
        n, heads, t, d = k.shape
        k = (
            k.reshape(groups, n // groups, heads, t, d)
            .transpose(1, 2)
            .reshape(groups, heads, -1, d)
        )
        labels = token_labels.to(k.dtype).reshape(groups, 1, -1, 1).expand(-1, heads, -1, 1)
        v = F.pad(labels, (0, d - 1))
        return k, v

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        prompt_k: torch.Tensor,
        prompt_v: torch.Tensor,
        key_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """Query tokens (B, T, C), pos (T, C), cached k, v (G, H, Nk, D) -> probabilities (B, H, T)
        (float32 under autocast)."""
        return float32_under_autocast(
            self._forward, tokens, pos, prompt_k, prompt_v, key_lengths=key_lengths
        )

    def _forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        prompt_k: torch.Tensor,
        prompt_v: torch.Tensor,
        key_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        q = self.embed(tokens, pos)
        # cross_attention scales by 1/sqrt(D); undo that so the logits are temperature * cosine.
        q = q * (self.log_temperature.exp() * math.sqrt(self.head_dim))
        out = cross_attention(q, prompt_k, prompt_v, key_lengths=key_lengths, kernel=self.kernel)
        return out[..., 0].clamp(0.0, 1.0)


def probability_logit(p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Probabilities in [0, 1] -> logits, clamped to [logit(eps), logit(1 - eps)]."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)
