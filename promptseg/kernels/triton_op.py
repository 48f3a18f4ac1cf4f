"""The Triton kernels as `torch.library` custom ops with autograd, traceable by torch.compile / torch.export.

promptseg::cross_attention_fwd(q, k, v, key_lengths?, bias?, deterministic) -> (out, lse)
promptseg::cross_attention_bwd(grad_out, q, k, v, out, lse, key_lengths?, bias?, deterministic) -> (dq, dk, dv)

Shapes: q, out, grad_out, dq (B, H, Nq, D); k, v, dk, dv (G, H, Nk, D); lse (B, H, Nq) float32;
key_lengths (G,) int; bias broadcastable to (G, H, Nq, Nk). Outputs are contiguous. `deterministic`
only selects the dk/dv accumulation of the backward; the forward ignores it. Gradients flow to
q, k and v; key_lengths and bias get none.
"""
from __future__ import annotations

from typing import Any

import torch

from promptseg.kernels.triton_backward import attention_backward
from promptseg.kernels.triton_forward import attention_forward


@torch.library.custom_op("promptseg::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32."""
    return attention_forward(q, k, v, key_lengths, bias)


@cross_attention_fwd.register_fake
def _cross_attention_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("promptseg::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: dq (B, H, Nq, D), dk and dv (G, H, Nk, D)."""
    return attention_backward(grad_out, q, k, v, out, lse, key_lengths, bias, deterministic)


@cross_attention_bwd.register_fake
def _cross_attention_bwd_fake(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, key_lengths, bias, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, bias)
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, key_lengths, bias = ctx.saved_tensors
    dq, dk, dv = cross_attention_bwd(grad_out, q, k, v, out, lse, key_lengths, bias, ctx.deterministic)
    return dq, dk, dv, None, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
