"""Plain PyTorch reference of query-to-prompt cross-attention (the contract of docs/design.md
section 3)."""

from __future__ import annotations

import torch


def expand_groups(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat group tensors so that query b sees group b // (B // G).

    t: (G, ...) -> (B, ...), B a multiple of G.
    """
    groups = t.shape[0]
    if groups == batch:
        return t
    return t.repeat_interleave(batch // groups, dim=0)


def key_padding_bias(
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    num_keys: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive (G, H|1, 1|Nq, Nk) bias combining `bias` and -inf past `key_lengths[g]`, or None."""
    total = None
    if bias is not None:
        total = bias.to(dtype)
        if total.dim() < 4:
            total = total.reshape((1,) * (4 - total.dim()) + tuple(total.shape))
        if total.shape[0] == 1 and groups > 1:
            total = total.expand(groups, *total.shape[1:])
    if key_lengths is not None:
        positions = torch.arange(num_keys, device=device)
        invalid = positions[None, :] >= key_lengths.to(device)[:, None]  # (G, Nk)
        mask = torch.zeros(groups, 1, 1, num_keys, dtype=dtype, device=device)
        mask = mask.masked_fill(invalid[:, None, None, :], float("-inf"))
        total = mask if total is None else total + mask
    return total


def reference_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    own_k: torch.Tensor | None = None,
    own_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v, written out in plain PyTorch.

    q: (B, H, Nq, D); k, v: (G, H, Nk, D) with B % G == 0; key_lengths: (G,) int or None;
    bias: additive, broadcastable to (G, H, Nq, Nk). own_k, own_v (B, H, Ns, D) or None: query b's
    own keys, appended to its group's keys in the same softmax (no bias on them).
    Returns (B, H, Nq, D) in q's dtype. A query row with no valid key returns zeros.
    `compute_dtype` (e.g. float64 in tests) sets the arithmetic precision; by default float32 for
    half inputs, else q's dtype.
    """
    batch, groups = q.shape[0], k.shape[0]
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(
        q.to(compute_dtype), expand_groups(k.to(compute_dtype), batch).transpose(-1, -2)
    )
    scores = scores * scale
    total_bias = key_padding_bias(key_lengths, bias, groups, k.shape[2], compute_dtype, q.device)
    if total_bias is not None:
        scores = scores + expand_groups(total_bias, batch)
    values = expand_groups(v.to(compute_dtype), batch)
    if own_k is not None and own_v is not None:
        own_scores = (
            torch.matmul(q.to(compute_dtype), own_k.to(compute_dtype).transpose(-1, -2)) * scale
        )
        scores = torch.cat([scores, own_scores], dim=-1)
        values = torch.cat([values, own_v.to(compute_dtype)], dim=2)
    # Rows with no valid key give zeros (and zero gradients) instead of a softmax over only -inf.
    has_key = torch.isfinite(scores).any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    out = torch.matmul(probs, values)
    return out.to(q.dtype)
