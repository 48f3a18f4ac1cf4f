"""Attention kernels behind one contract (docs/design.md section 3).

The kernels are `reference`, `sdpa` and `triton` (ATTENTION_KERNELS); "backend" is the word for the
inference runtimes of promptseg.engine.backends, never for these.

`cross_attention(q, k, v, key_lengths=None, bias=None, kernel=..., own_k=None, own_v=None)`:
q (B, H, Nq, D); k, v (G, H, Nk, D) with B a multiple of G (query b uses group b // (B // G));
key_lengths (G,) int or None; bias additive, broadcastable to (G, H, Nq, Nk).
own_k, own_v (B, H, Ns, D) or None: keys and values of query b's own tokens, attended in the same
softmax as its group's keys (a query that attends to the prompts and to itself, as in a decoder
over the concatenated prompt and query tokens); bias is not combined with them.
Returns (B, H, Nq, D) in q's dtype, differentiable in q, k, v (and own_k, own_v).
"""

from __future__ import annotations

import torch

from promptseg.errors import PromptSegError
from promptseg.kernels.reference import reference_cross_attention
from promptseg.kernels.sdpa import sdpa_cross_attention

ATTENTION_KERNELS = ("reference", "sdpa", "triton")


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run here (on `device` when given), and if not, why (one
    line)."""
    try:
        from promptseg.kernels import triton_attention
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - depends on the installation
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "triton":
            return False, "triton is not installed (it comes with pip install 'promptseg[gpu]')"
        return False, f"triton backend unavailable: {exc}"
    return triton_attention.is_available(device)


def check_kernel_device(kernel: str, device: torch.device | str) -> None:
    """PromptSegError (one line) when attention `kernel` cannot run on tensors of `device`.

    Only the Triton kernels are tied to a device kind (CUDA, or the CPU under TRITON_INTERPRET=1);
    the reference and SDPA kernels run anywhere.
    """
    if kernel == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise PromptSegError(
                f"attention kernel 'triton' cannot run on {torch.device(device)}: {why}"
            )


def default_kernel(device: torch.device | str) -> str:
    """The kernel used when none is named: Triton on CUDA when it works, otherwise SDPA."""
    if torch.device(device).type == "cuda" and triton_available(device)[0]:
        return "triton"
    return "sdpa"


def check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    own_k: torch.Tensor | None = None,
    own_v: torch.Tensor | None = None,
) -> None:
    """Raise ValueError when the tensors break the attention contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected 4-D q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"heads/dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"batch {q.shape[0]} is not a multiple of key groups {k.shape[0]}")
    if key_lengths is not None and tuple(key_lengths.shape) != (k.shape[0],):
        raise ValueError(
            f"key_lengths must have shape ({k.shape[0]},), got {tuple(key_lengths.shape)}"
        )
    if (own_k is None) != (own_v is None):
        raise ValueError("own_k and own_v must be given together")
    if own_k is not None and own_v is not None:
        if own_k.dim() != 4 or own_k.shape != own_v.shape:
            raise ValueError(
                f"own_k {tuple(own_k.shape)} and own_v {tuple(own_v.shape)} must be one 4-D shape"
            )
        if (
            own_k.shape[0] != q.shape[0]
            or own_k.shape[1] != q.shape[1]
            or own_k.shape[3] != q.shape[3]
        ):
            raise ValueError(
                f"own_k {tuple(own_k.shape)} must be (B, H, Ns, D) for q {tuple(q.shape)}"
            )


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    kernel: str = "sdpa",
    own_k: torch.Tensor | None = None,
    own_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query-to-prompt attention with shared key groups; see the module docstring for shapes."""
    check_shapes(q, k, v, key_lengths, own_k, own_v)
    if own_k is not None and bias is not None:
        raise ValueError("bias cannot be combined with own_k / own_v")
    if kernel == "reference":
        return reference_cross_attention(q, k, v, key_lengths, bias, own_k=own_k, own_v=own_v)
    if kernel == "sdpa":
        return sdpa_cross_attention(q, k, v, key_lengths, bias, own_k=own_k, own_v=own_v)
    if kernel == "triton":
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(why)
        from promptseg.kernels.triton_attention import (
            triton_cross_attention,
            triton_joint_attention,
        )

        if own_k is not None and own_v is not None:
            return triton_joint_attention(q, k, v, key_lengths, own_k, own_v)
        return triton_cross_attention(q, k, v, key_lengths, bias)
    raise ValueError(
        f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}"
    )
