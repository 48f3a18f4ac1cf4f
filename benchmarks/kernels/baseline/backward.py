"""Frozen copy of promptseg/kernels/triton_backward.py as it was before issue 16 items 12-14
(commit 76c0168): the "before" of the GPU session's kernel comparison. Not used by promptseg.

Triton backward kernels of query-to-prompt cross-attention.

With S = q kᵀ · scale + bias, P = softmax(S) (rows), O = P v and upstream gradient dO:
    delta = rowsum(dO * O),  dP = dO vᵀ,  dS = P * (dP - delta),
    dq = scale · dS k,       dv_g = Σ_b Pᵀ dO,  dk_g = scale · Σ_b dSᵀ q,
where the sums run over the B / G queries b that share key group g. P is rebuilt from the
forward's log-sum-exp, so nothing of size Nq x Nk is ever stored.

Three kernels: `_delta_kernel` (preprocess), `_dq_kernel` (one program per query tile, looping over
keys) and `_dkdv_kernel` (one program per key tile and split of the sharing queries, looping over
the queries of its split). When key tiles alone cannot fill the GPU (small Nk, many queries per
group) the B / G queries are cut into splits (`query_splits`). Deterministic mode (the default):
each split stores fp32 partial sums in its own slice of a workspace, summed afterwards by a
deterministic reduction (a single split stores dk, dv directly). Atomic mode: the splits add into
fp32 buffers with atomics; no workspace, but the summation order varies run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.kernels.baseline.forward import (
    INTERPRET,
    LOG2E,
    MAX_GRID_AXIS12,
    bias_view,
    block_scores,
    buckets,
    dot_precision,
    flat_grid,
    flat_program,
    head_block,
    lengths_view,
    on_device,
    tile_configs,
    tiled_kernel,
    valid_key_count,
)

DELTA_BLOCK_M = 32 if INTERPRET else 64
# Key tile size assumed when sizing the query splits (the tuned BLOCK_N may differ; this only steers
# how much parallelism the splits add).
SPLIT_REFERENCE_BLOCK_N = 64

DQ_CONFIGS = tile_configs(
    gpu_tiles=[(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3)],
    hopper_tiles=[(128, 128, 8, 2), (64, 128, 4, 3)],
)
DKDV_CONFIGS = tile_configs(
    gpu_tiles=[(32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 3)],
    hopper_tiles=[(64, 128, 8, 3), (128, 128, 8, 2)],
)


@triton.jit
def _delta_kernel(
    Out,
    dOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    num_heads,
    N_Q,
    HEAD_DIM,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, m] = Σ_d dO[b, h, m, d] · O[b, h, m, d] in fp32; Delta is contiguous (B, H, Nq).

    Launched on flat_grid(cdiv(N_Q, BLOCK_M), B · H).
    """
    pid_bh, start_m = flat_program(N_Q, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        Out
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        dOut
        + b.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_m[:, None] * stride_gm
        + offs_d[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    Bias,
    Lengths,
    dOut,
    Lse,
    Delta,
    dQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bg,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    num_heads,
    queries_per_group,
    qk_scale,
    sm_scale,
    N_Q,
    N_K,
    HEAD_DIM,
    N_Q_BUCKET,
    N_K_BUCKET,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one (b, h), looping over the valid keys of its
    group.

    Launched on flat_grid(cdiv(N_Q, BLOCK_M), B · H). N_Q_BUCKET, N_K_BUCKET only key the
    autotuning.
    """
    pid_bh, start_m = flat_program(N_Q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    g = b // queries_per_group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=tile_ok,
        other=0.0,
    )
    do = tl.load(
        dOut
        + b.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_m[:, None] * stride_gm
        + offs_d[None, :] * stride_gd,
        mask=tile_ok,
        other=0.0,
    )
    lse2 = (
        tl.load(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf"))
        * 1.4426950408889634
    )
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    k_ptrs = (
        K + g.to(tl.int64) * stride_kg + h.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    )
    vt_ptrs = (
        V + g.to(tl.int64) * stride_vg + h.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd
    )
    bias_ptrs = (
        Bias + g.to(tl.int64) * stride_bg + h.to(tl.int64) * stride_bh + offs_m[:, None] * stride_bm
    )
    n_end = valid_key_count(Lengths, g, N_K, HAS_LENGTHS)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < n_end
        kv_mask = key_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
        kt = tl.load(k_ptrs + cols[None, :] * stride_kn, mask=kv_mask, other=0.0)
        vt = tl.load(vt_ptrs + cols[None, :] * stride_vn, mask=kv_mask, other=0.0)
        s = block_scores(
            q,
            kt,
            bias_ptrs,
            offs_m,
            cols,
            key_ok,
            N_Q,
            qk_scale,
            stride_bn,
            HAS_BIAS,
            DOT_PRECISION,
        )
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    tl.store(
        dQ
        + b.to(tl.int64) * stride_dqb
        + h.to(tl.int64) * stride_dqh
        + offs_m[:, None] * stride_dqm
        + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(dQ.dtype.element_ty),
        mask=tile_ok,
    )


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    Bias,
    Lengths,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kg,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bg,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dks,
    stride_dkg,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    num_heads,
    queries_per_group,
    queries_per_split,
    qk_scale,
    sm_scale,
    N_Q,
    N_K,
    HEAD_DIM,
    N_Q_BUCKET,
    N_K_BUCKET,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: the dk, dv contributions to BLOCK_N keys of one (g, h) from one split of its
    queries.

    Launched on flat_grid(cdiv(N_K, BLOCK_N), G · H) extended by the splits on axis 1.
    Split s = program_id(1) covers queries g · QPG + s · queries_per_split onwards (QPG = B / G, the
    last split may be shorter). ATOMIC False: stores into slice s of dK / dV (stride_dks apart; a
    single split passes the (G, H, Nk, D) gradients themselves). ATOMIC True: atomically adds into
    fp32 (G, H, Nk, D) buffers. dK and dV share the strides stride_dk*. Key tiles at or past
    key_lengths[g] skip the query loop (and store zeros). N_Q_BUCKET, N_K_BUCKET only key the
    autotuning.
    """
    pid_gh, start_n = flat_program(N_K, BLOCK_N)
    g = pid_gh // num_heads
    h = pid_gh % num_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_end = valid_key_count(Lengths, g, N_K, HAS_LENGTHS)
    key_ok = offs_n < n_end
    kv_mask = key_ok[:, None] & d_ok[None, :]

    k = tl.load(
        K
        + g.to(tl.int64) * stride_kg
        + h.to(tl.int64) * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V
        + g.to(tl.int64) * stride_vg
        + h.to(tl.int64) * stride_vh
        + offs_n[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    kt = tl.trans(k)
    vt = tl.trans(v)
    bias_base = Bias + g.to(tl.int64) * stride_bg + h.to(tl.int64) * stride_bh
    split = tl.program_id(1)
    first_query = g * queries_per_group + split * queries_per_split
    num_queries = tl.minimum(queries_per_split, queries_per_group - split * queries_per_split)
    # No query work at all for a key tile that lies entirely past the group's length.
    m_end = tl.where(start_n < n_end, N_Q, 0)

    q_base = (
        Q
        + first_query.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_d[None, :] * stride_qd
    )
    do_base = (
        dOut
        + first_query.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_d[None, :] * stride_gd
    )
    row_base = (
        first_query.to(tl.int64) * num_heads + h
    ) * N_Q  # offset of query row 0 in Lse / Delta
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for _ in range(num_queries):
        for start_m in range(0, m_end, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < N_Q
            tile_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm, mask=tile_ok, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_gm, mask=tile_ok, other=0.0)
            lse2 = (
                tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            )
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            s = block_scores(
                q,
                kt,
                bias_base + rows[:, None] * stride_bm,
                rows,
                offs_n,
                key_ok,
                N_Q,
                qk_scale,
                stride_bn,
                HAS_BIAS,
                DOT_PRECISION,
            )
            p = tl.exp2(s - lse2[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        q_base += stride_qb
        do_base += stride_gb
        row_base += num_heads * N_Q

    out_offs = (
        split.to(tl.int64) * stride_dks
        + g.to(tl.int64) * stride_dkg
        + h.to(tl.int64) * stride_dkh
        + offs_n[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd
    )
    out_mask = (offs_n[:, None] < N_K) & d_ok[None, :]
    if ATOMIC:
        tl.atomic_add(dK + out_offs, dk * sm_scale, mask=out_mask)
        tl.atomic_add(dV + out_offs, dv, mask=out_mask)
    else:
        tl.store(dK + out_offs, (dk * sm_scale).to(dK.dtype.element_ty), mask=out_mask)
        tl.store(dV + out_offs, dv.to(dV.dtype.element_ty), mask=out_mask)


DQ_KERNEL = tiled_kernel(_dq_kernel, DQ_CONFIGS, key=["HEAD_DIM", "HAS_BIAS", "HAS_LENGTHS"])
DKDV_KERNEL = tiled_kernel(
    _dkdv_kernel,
    DKDV_CONFIGS,
    key=["HEAD_DIM", "queries_per_split", "HAS_BIAS", "HAS_LENGTHS", "ATOMIC"],
    reset_to_zero=["dK", "dV"],
)
# Programs the deterministic dk/dv launch aims for, whatever the GPU: its split count, and so the
# grouping of its partial sums, must not depend on the device's SM count (about two waves of an
# H100).
DETERMINISTIC_SPLIT_TARGET = 256


def query_splits(
    num_keys: int,
    groups_heads: int,
    queries_per_group: int,
    device: torch.device,
    deterministic: bool = True,
) -> int:
    """How many splits to cut the B / G queries of a group into for the dk/dv kernel.

    Enough that (key tiles of SPLIT_REFERENCE_BLOCK_N) x (G · H) x splits reaches about two waves of
    the GPU (DETERMINISTIC_SPLIT_TARGET programs in deterministic mode, 8 under the interpreter),
    never more than B / G nor than grid axis 1 holds.
    """
    if device.type != "cuda":
        target = 8
    elif deterministic:
        target = DETERMINISTIC_SPLIT_TARGET
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(num_keys, SPLIT_REFERENCE_BLOCK_N) * groups_heads
    return max(1, min(queries_per_group, triton.cdiv(target, programs), MAX_GRID_AXIS12))


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the forward w.r.t. q, k, v.

    grad_out, out (B, H, Nq, D); q (B, H, Nq, D); k, v (G, H, Nk, D); lse (B, H, Nq) float32 from
    `attention_forward`; key_lengths, bias as in the forward. Returns contiguous dq (B, H, Nq, D),
    dk and dv (G, H, Nk, D) in the dtypes of q, k, v. `deterministic=False` adds the query splits'
    dk / dv with atomics instead of storing per-split partials that a deterministic reduction sums.

    Deterministic results are bit-identical for the same inputs, tiles and Triton build. The split
    count does not depend on the GPU; the tiles come from autotuning (timing-based, so they may
    differ between processes) unless PROMPTSEG_TRITON_AUTOTUNE=0 fixes them (`fixed_config`): set it
    for gradients that are bit-identical across processes and machines.
    """
    batch, heads, num_queries, head_dim = q.shape
    groups, _, num_keys, _ = k.shape
    queries_per_group = batch // groups
    full_bias, bias_strides = bias_view(bias, groups, heads, num_queries, num_keys)
    lengths = lengths_view(key_lengths, q.device)
    block_d = head_block(head_dim)
    sm_scale = head_dim**-0.5
    common = dict(
        HAS_BIAS=full_bias is not None,
        HAS_LENGTHS=lengths is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d,
    )
    bias_arg = q if full_bias is None else full_bias
    lengths_arg = lse if lengths is None else lengths

    delta = torch.empty_like(lse)
    dq = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    splits = query_splits(num_keys, groups * heads, queries_per_group, q.device, deterministic)
    queries_per_split = triton.cdiv(queries_per_group, splits)
    splits = triton.cdiv(queries_per_group, queries_per_split)  # no empty split
    atomic = not deterministic and splits > 1
    grad_shape = (groups, heads, num_keys, head_dim)
    if atomic:
        dk = torch.zeros(grad_shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(grad_shape, dtype=torch.float32, device=k.device)
    elif splits > 1:
        dk = torch.empty((splits,) + grad_shape, dtype=torch.float32, device=k.device)
        dv = torch.empty((splits,) + grad_shape, dtype=torch.float32, device=k.device)
    else:
        dk = torch.empty(grad_shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(grad_shape, dtype=v.dtype, device=v.device)
    split_stride = dk.stride(0) if dk.dim() == 5 else 0
    grad_strides = dk.stride()[-4:]

    def dq_grid(meta: dict) -> tuple[int]:
        return flat_grid(triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads)

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return flat_grid(triton.cdiv(num_keys, meta["BLOCK_N"]), groups * heads) + (splits,)

    with on_device(q):
        _delta_kernel[flat_grid(triton.cdiv(num_queries, DELTA_BLOCK_M), batch * heads)](
            out,
            grad_out,
            delta,
            *out.stride(),
            *grad_out.stride(),
            heads,
            num_queries,
            head_dim,
            BLOCK_D=block_d,
            BLOCK_M=DELTA_BLOCK_M,
        )
        DQ_KERNEL.launch(
            dq_grid,
            num_queries,
            num_keys,
            q,
            k,
            v,
            bias_arg,
            lengths_arg,
            grad_out,
            lse,
            delta,
            dq,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *bias_strides,
            *grad_out.stride(),
            *dq.stride(),
            heads,
            queries_per_group,
            sm_scale * LOG2E,
            sm_scale,
            num_queries,
            num_keys,
            head_dim,
            *buckets(num_queries, num_keys),
            **common,
        )
        DKDV_KERNEL.launch(
            dkdv_grid,
            num_queries,
            num_keys,
            q,
            k,
            v,
            bias_arg,
            lengths_arg,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *bias_strides,
            *grad_out.stride(),
            split_stride,
            *grad_strides,
            heads,
            queries_per_group,
            queries_per_split,
            sm_scale * LOG2E,
            sm_scale,
            num_queries,
            num_keys,
            head_dim,
            *buckets(num_queries, num_keys),
            ATOMIC=atomic,
            **common,
        )
    if dk.dim() == 5:  # per-split partials; torch's reduction over dim 0 is deterministic
        dk, dv = dk.sum(0), dv.sum(0)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
