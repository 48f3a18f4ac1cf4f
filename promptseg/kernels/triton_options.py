"""Launch options of the Triton attention kernels that the environment can switch (issue 16).

PROMPTSEG_TRITON_TF32 (`tf32_enabled`): whether fp32 inputs take TF32 tensor-core dots (10-bit
mantissa) instead of exact "ieee" fp32 dots. "auto" (default): on CUDA in inference only (no input
needs a gradient), so training keeps exact dots; "1": also in training (forward and backward);
"0": never. Half-precision inputs always use tensor cores and are unaffected. The bound TF32 keeps
(TF32_RELATIVE_BOUND) is checked against the float64 reference on the GPU by
tests/test_triton_attention.py::test_tf32_dots_stay_within_their_bound (in the GPU-session tests).

PROMPTSEG_TRITON_PACK_QUERIES (`queries_per_set`): "1" (default) packs the B / G queries that
share a key group into the M axis of the forward and dq kernels (their B / G · Nq rows are tiled as
one, and neighbouring programs read one group's keys) and the queries of each split into the M axis
of the dk/dv kernel; "0" keeps one query at a time, the layout before packing (for before/after
measurements).

Neither module-level state nor triton is needed here, so the policy is testable anywhere.
"""

from __future__ import annotations

import os

import torch

TF32_ENV = "PROMPTSEG_TRITON_TF32"
PACK_ENV = "PROMPTSEG_TRITON_PACK_QUERIES"
TF32_MODES = ("auto", "0", "1")
# Bound on max|error| / max|float64 reference| of the output and of dq, dk, dv with TF32 dots, on
# N(0, 1) inputs. Tensor cores read the top 10 mantissa bits of fp32 operands (truncation; the PTX
# has no cvt.rna.tf32); emulating that on the CPU (benchmarks/kernels/tf32_error.py) gives at most
# 3.0e-3 for the output and 5.2e-3 for dq, dk, dv (D 32-128, Nk 37 and 2053, q scaled by 1 and 3),
# so the bound leaves a factor of about two. Exact fp32 dots stay within 1e-5.
TF32_RELATIVE_BOUND = 1e-2


def tf32_mode() -> str:
    """PROMPTSEG_TRITON_TF32 ("auto" when unset); ValueError (one line) for another value."""
    mode = os.environ.get(TF32_ENV, "auto").strip().lower() or "auto"
    if mode not in TF32_MODES:
        raise ValueError(f"{TF32_ENV}={mode!r} is not one of {', '.join(TF32_MODES)}")
    return mode


def tf32_enabled(dtype: torch.dtype, device: torch.device | str, training: bool) -> bool:
    """Whether kernels on `dtype` inputs of `device` use TF32 dots: only fp32 on CUDA; in "auto"
    mode only when not `training` (no input needs a gradient)."""
    if dtype != torch.float32 or torch.device(device).type != "cuda":
        return False
    mode = tf32_mode()
    return mode == "1" or (mode == "auto" and not training)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through these inputs (grad mode on and one requires
    grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def packing_enabled() -> bool:
    """Whether the forward and dq kernels pack a group's queries (PROMPTSEG_TRITON_PACK_QUERIES not
    "0")."""
    return os.environ.get(PACK_ENV, "1").strip() != "0"


def queries_per_set(queries_per_group: int) -> int:
    """Queries tiled as one row set: all B / G queries of a group when packing, else one."""
    return queries_per_group if packing_enabled() else 1
