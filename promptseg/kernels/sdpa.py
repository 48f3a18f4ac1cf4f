"""Cross-attention through torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptseg.kernels.reference import expand_groups, key_padding_bias


def sdpa_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    own_k: torch.Tensor | None = None,
    own_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_cross_attention`, computed by SDPA.

    SDPA has no notion of shared key groups, so k and v (G, H, Nk, D) are expanded to B
    (a view when G == 1) and ragged key_lengths become an additive -inf mask. On the CPU, half
    inputs (bf16 autocast training) are computed in float32: there SDPA's float32 flash kernel is
    faster than its bf16 one, forward and backward (benchmarks/train/README.md).
    A query's own keys own_k, own_v (B, H, Ns, D) are concatenated after its group's keys (one
    SDPA call, the masks padded with zeros for them).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        own = (None, None) if own_k is None or own_v is None else (own_k.float(), own_v.float())
        with torch.autocast("cpu", enabled=False):
            out = sdpa_cross_attention(
                q.float(), k.float(), v.float(), key_lengths, bias, scale, *own
            )
        return out.to(q.dtype)
    batch, groups = q.shape[0], k.shape[0]
    total_bias = key_padding_bias(key_lengths, bias, groups, k.shape[2], q.dtype, q.device)
    if groups == 1:
        k_b, v_b = k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])
    else:
        k_b, v_b = expand_groups(k, batch), expand_groups(v, batch)
    mask = None if total_bias is None else expand_groups(total_bias, batch)
    if own_k is not None and own_v is not None:
        k_b, v_b = (
            torch.cat([k_b, own_k.to(k_b.dtype)], dim=2),
            torch.cat([v_b, own_v.to(v_b.dtype)], dim=2),
        )
        if mask is not None:
            mask = F.pad(mask, (0, own_k.shape[2]))
        # Every row has at least its own keys, so none is empty.
        return F.scaled_dot_product_attention(q, k_b, v_b, attn_mask=mask, scale=scale)
    out = F.scaled_dot_product_attention(q, k_b, v_b, attn_mask=mask, scale=scale)
    if key_lengths is not None:
        # Rows of a group with no valid key: softmax over only -inf gives NaN; the contract says
        # zeros.
        empty = key_lengths.to(q.device) == 0
        if bool(empty.any()):
            out = out.masked_fill(expand_groups(empty, batch)[:, None, None, None], 0.0)
    return out
