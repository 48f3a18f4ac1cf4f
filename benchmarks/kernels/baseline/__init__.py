"""The Triton attention kernels as they were before issue 16 items 12-14 (exact fp32 dots, one query
per program row, masks and scaling on every key tile, runtime head dim, dk/dv from transposed P and
dS), kept so that `benchmarks.kernels.bench_attention --providers triton_baseline` can time the
"before" beside the current kernels on the same GPU. Not used by promptseg.

`baseline_cross_attention(q, k, v, key_lengths)`: q (B, H, Nq, D); k, v (G, H, Nk, D); key_lengths
(G,) or None. Returns (B, H, Nq, D), differentiable in q, k, v (deterministic backward).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.kernels.baseline.backward import attention_backward
from benchmarks.kernels.baseline.forward import attention_forward


class BaselineAttention(torch.autograd.Function):
    """The baseline forward kernel, and its backward kernels on the saved out and lse."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        out, lse = attention_forward(q, k, v, key_lengths, None)
        ctx.save_for_backward(q, k, v, out, lse, key_lengths)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, key_lengths = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, key_lengths, None, True
        )
        return dq, dk, dv, None


def baseline_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q kᵀ · D^-0.5) v over the valid keys of each query's group, on the baseline
    kernels."""
    return BaselineAttention.apply(q, k, v, key_lengths)
