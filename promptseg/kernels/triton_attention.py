"""Triton backend of `promptseg.kernels.cross_attention` (FlashAttention-2 style, shared key
groups).

q (B, H, Nq, D); k, v (G, H, Nk, D) with B % G == 0: query b reads key group b // (B // G) in place.
key_lengths (G,) int or None: keys at index >= key_lengths[g] are ignored (length 0 gives zero
rows). bias additive, broadcastable to (G, H, Nq, Nk), or None (it gets no gradient). D <= 128;
fp16, bf16 or fp32. The forward kernel is `triton_forward`, the backward kernels `triton_backward`;
this module registers them as the `torch.library` custom ops below (with autograd, traceable by
torch.compile and torch.export) and holds the entry points the dispatcher calls:

promptseg::cross_attention_fwd(q, k, v, key_lengths?, bias?, deterministic, tf32=False) ->
(out, lse)
promptseg::cross_attention_bwd(grad_out, q, k, v, out, lse, key_lengths?, bias?, deterministic,
tf32=False) -> (dq, dk, dv)

Shapes: q, out, grad_out, dq (B, H, Nq, D); k, v, dk, dv (G, H, Nk, D); lse (B, H, Nq) float32;
key_lengths (G,) int; bias broadcastable to (G, H, Nq, Nk). Outputs are contiguous. `deterministic`
only selects the dk/dv accumulation of the backward; the forward ignores it. `tf32` gives fp32
inputs TF32 tensor-core dots (the forward's choice is reused by its backward); the entry points
below choose it with `promptseg.kernels.triton_options.tf32_enabled` (PROMPTSEG_TRITON_TF32: by
default on CUDA in inference only). Gradients flow to
q, k and v; key_lengths and bias get none. Kernels run on CUDA, or on the CPU when
TRITON_INTERPRET=1 was set before import.

Parity: tests/test_triton_attention.py (every kernel against the float64 reference of
promptseg.kernels.reference, forward and backward, on fresh random inputs, under the interpreter in
CI). Speed: benchmarks/kernels/bench_attention.py (against SDPA and the reference).
"""

from __future__ import annotations

from typing import Any

import torch

from promptseg.kernels.triton_backward import attention_backward
from promptseg.kernels.triton_forward import INTERPRET, MAX_HEAD_DIM, attention_forward
from promptseg.kernels.triton_options import needs_grad, tf32_enabled

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") when the kernels can run here, else (False, one-line reason).

    Without `device`: whether they run anywhere in this process (a CUDA GPU, or the Triton
    interpreter). With `device`: whether they run on tensors of that device: CPU devices under the
    interpreter (TRITON_INTERPRET=1 set before promptseg imports triton), CUDA devices otherwise.
    """
    if device is None:
        if INTERPRET or torch.cuda.is_available():
            return True, ""
        return (
            False,
            "triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 set before promptseg imports "
            "triton)",
        )
    kind = torch.device(device).type
    if INTERPRET:
        if kind == "cpu":
            return True, ""
        return False, f"triton backend runs on the CPU only under TRITON_INTERPRET=1, not on {kind}"
    if kind != "cuda":
        return (
            False,
            f"triton backend runs on CUDA devices, not {kind} (TRITON_INTERPRET=1 runs it on the "
            "CPU)",
        )
    if not torch.cuda.is_available():
        return False, "triton backend needs a CUDA GPU, and PyTorch sees none"
    return True, ""


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ValueError / RuntimeError for inputs the kernels do not handle (shapes are checked by
    the dispatcher)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, "
            f"{v.dtype}"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds the kernels' maximum {MAX_HEAD_DIM}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v live on different devices: {q.device}, {k.device}, {v.device}")
    if INTERPRET:
        if q.device.type != "cpu":
            raise RuntimeError("TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only")
        if q.dtype == torch.bfloat16:
            raise RuntimeError(
                "the Triton interpreter does not support bfloat16; use float16 or float32"
            )
    elif q.device.type != "cuda":
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {q.device}")
    if bias is not None:
        groups, heads, num_queries, num_keys = k.shape[0], q.shape[1], q.shape[2], k.shape[2]
        target = (groups, heads, num_queries, num_keys)
        if bias.dim() > 4 or not all(s in (1, t) for s, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(
                f"bias {tuple(bias.shape)} does not broadcast to (G, H, Nq, Nk) = {target}"
            )


@torch.library.custom_op("promptseg::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32."""
    return attention_forward(q, k, v, key_lengths, bias, tf32)


@cross_attention_fwd.register_fake
def _cross_attention_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool,
    tf32: bool = False,
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
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: dq (B, H, Nq, D), dk and dv (G, H, Nk, D)."""
    return attention_backward(grad_out, q, k, v, out, lse, key_lengths, bias, deterministic, tf32)


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
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, key_lengths, bias, deterministic, tf32 = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, bias)
    ctx.deterministic = deterministic
    ctx.tf32 = tf32
    ctx.mark_non_differentiable(lse)


def _backward(
    ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, key_lengths, bias = ctx.saved_tensors
    dq, dk, dv = cross_attention_bwd(
        grad_out, q, k, v, out, lse, key_lengths, bias, ctx.deterministic, ctx.tf32
    )
    return dq, dk, dv, None, None, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """softmax(q kᵀ · D^-0.5 + bias) v over the valid keys of each query's group.

    Returns (B, H, Nq, D) in q's dtype, differentiable in q, k, v. `deterministic=False` lets the
    backward add dk / dv of the B / G queries sharing a group with atomics (faster, not bit-stable).
    fp32 inputs take TF32 dots where `tf32_enabled` says so (by default on CUDA when no input needs
    a gradient; PROMPTSEG_TRITON_TF32=0 turns them off, =1 on in training too).
    """
    check_inputs(q, k, v, bias)
    tf32 = tf32_enabled(q.dtype, q.device, needs_grad(q, k, v))
    out, _ = cross_attention_fwd(q, k, v, key_lengths, bias, deterministic, tf32)
    return out


def merge_partial_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets merged into one softmax: out_a, out_b (B, H, Nq, D) with
    their natural-log lse_a, lse_b (B, H, Nq) float32 (+inf or -inf for a set with no valid key)
    -> (out (B, H, Nq, D) in `dtype`, lse (B, H, Nq) float32). lse_b must be finite."""
    lse_a = torch.where(torch.isinf(lse_a), torch.full_like(lse_a, float("-inf")), lse_a)
    lse = torch.logaddexp(lse_a, lse_b)
    out = (
        torch.exp(lse_a - lse)[..., None] * out_a.float()
        + torch.exp(lse_b - lse)[..., None] * out_b.float()
    )
    return out.to(dtype).contiguous(), lse


class JointAttention(torch.autograd.Function):
    """Group keys and each query's own keys in one softmax, on the Triton kernels unchanged.

    Forward: the kernel over the group's keys and the kernel over the query's own keys (as B groups
    of one query batch each), merged by their log-sum-exps. Backward: the FlashAttention backward
    of a key subset needs only the full output and full lse (dS = P (dP - rowsum(dO O)) with
    P = exp(S - lse)), so both kernels' backward run with the merged out and lse, and dq adds up.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_lengths: torch.Tensor | None,
        own_k: torch.Tensor,
        own_v: torch.Tensor,
        deterministic: bool,
        tf32: bool,
    ) -> torch.Tensor:
        out_a, lse_a = cross_attention_fwd(q, k, v, key_lengths, None, deterministic, tf32)
        out_b, lse_b = cross_attention_fwd(q, own_k, own_v, None, None, deterministic, tf32)
        out, lse = merge_partial_attention(out_a, lse_a, out_b, lse_b, q.dtype)
        ctx.save_for_backward(q, k, v, own_k, own_v, out, lse, key_lengths)
        ctx.deterministic = deterministic
        ctx.tf32 = tf32
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, own_k, own_v, out, lse, key_lengths = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq_a, dk, dv = cross_attention_bwd(
            grad_out, q, k, v, out, lse, key_lengths, None, ctx.deterministic, ctx.tf32
        )
        dq_b, own_dk, own_dv = cross_attention_bwd(
            grad_out, q, own_k, own_v, out, lse, None, None, ctx.deterministic, ctx.tf32
        )
        return dq_a + dq_b, dk, dv, None, own_dk, own_dv, None, None


def triton_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    deterministic: bool = True,
) -> torch.Tensor:
    """softmax over the valid keys of query b's group k, v (G, H, Nk, D) and its own keys own_k,
    own_v (B, H, Ns, D) together; q (B, H, Nq, D). Returns (B, H, Nq, D) in q's dtype,
    differentiable in q, k, v, own_k, own_v."""
    check_inputs(q, k, v, None)
    check_inputs(q, own_k, own_v, None)
    tf32 = tf32_enabled(q.dtype, q.device, needs_grad(q, k, v, own_k, own_v))
    return JointAttention.apply(q, k, v, key_lengths, own_k, own_v, deterministic, tf32)
