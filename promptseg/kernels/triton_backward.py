"""Triton backward kernels of query-to-prompt cross-attention.

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

from promptseg.kernels.triton_forward import (
    INTERPRET,
    LOG2E,
    MAX_GRID_AXIS12,
    bias_view,
    biased_scores,
    buckets,
    dot_precision,
    flat_grid,
    flat_program,
    head_block,
    lengths_view,
    load_masked,
    on_device,
    row_set_program,
    tile_configs,
    tiled_kernel,
    valid_key_count,
)
from promptseg.kernels.triton_options import queries_per_set

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
    HEAD_DIM: tl.constexpr,
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
    row_ok = (offs_m < N_Q)[:, None]
    d_ok = (offs_d < HEAD_DIM)[None, :]
    o = load_masked(
        Out
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        row_ok,
        d_ok,
        True,
        HEAD_DIM != BLOCK_D,
    )
    do = load_masked(
        dOut
        + b.to(tl.int64) * stride_gb
        + h.to(tl.int64) * stride_gh
        + offs_m[:, None] * stride_gm
        + offs_d[None, :] * stride_gd,
        row_ok,
        d_ok,
        True,
        HEAD_DIM != BLOCK_D,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def dq_step(
    dq,
    q,
    do,
    lse2,
    delta,
    k_ptrs,
    vt_ptrs,
    bias_ptrs,
    start_n,
    n_end,
    qk_scale,
    stride_kn,
    stride_vn,
    stride_bn,
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq (BLOCK_M, BLOCK_D) fp32 plus the contribution of the key tile starting at start_n
    (unscaled by D^-0.5); MASK_KEYS only on the tile holding n_end."""
    cols = start_n + offs_n
    key_ok = cols < n_end
    d_ok = offs_d < HEAD_DIM
    kt = load_masked(
        k_ptrs + cols[None, :] * stride_kn,
        key_ok[None, :],
        d_ok[:, None],
        MASK_KEYS,
        HEAD_DIM != BLOCK_D,
    )
    vt = load_masked(
        vt_ptrs + cols[None, :] * stride_vn,
        key_ok[None, :],
        d_ok[:, None],
        MASK_KEYS,
        HEAD_DIM != BLOCK_D,
    )
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if HAS_BIAS or MASK_KEYS:
        s = biased_scores(
            qk, bias_ptrs, cols[None, :], key_ok[None, :], qk_scale, stride_bn, HAS_BIAS, MASK_KEYS
        )
        p = tl.exp2(s - lse2[:, None])
    else:
        p = tl.exp2(qk * qk_scale - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)


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
    queries_per_set,
    qk_scale,
    sm_scale,
    N_Q,
    N_K,
    N_Q_BUCKET,
    N_K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: dq of BLOCK_M rows of one row set (as in the forward: queries_per_set queries of
    group g, one head), looping over the valid keys of g with only the boundary key tile masked.

    Launched on flat_grid(cdiv(queries_per_set · N_Q, BLOCK_M), B / queries_per_set · H).
    N_Q_BUCKET, N_K_BUCKET only key the autotuning.
    """
    pid_set, h, first, rows = row_set_program(N_Q, queries_per_set, num_heads, BLOCK_M)
    g = first // queries_per_group
    b = (first + rows // N_Q).to(tl.int64)
    m = rows % N_Q
    row_ok = rows < queries_per_set * N_Q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = load_masked(
        Q
        + h.to(tl.int64) * stride_qh
        + (b * stride_qb + m * stride_qm)[:, None]
        + offs_d[None, :] * stride_qd,
        row_ok[:, None],
        d_ok[None, :],
        True,
        HEAD_DIM != BLOCK_D,
    )
    do = load_masked(
        dOut
        + h.to(tl.int64) * stride_gh
        + (b * stride_gb + m * stride_gm)[:, None]
        + offs_d[None, :] * stride_gd,
        row_ok[:, None],
        d_ok[None, :],
        True,
        HEAD_DIM != BLOCK_D,
    )
    row_index = (b * num_heads + h) * N_Q + m  # of each row in Lse / Delta (B, H, Nq)
    lse2 = tl.load(Lse + row_index, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row_index, mask=row_ok, other=0.0)
    k_ptrs = (
        K + g.to(tl.int64) * stride_kg + h.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    )
    vt_ptrs = (
        V + g.to(tl.int64) * stride_vg + h.to(tl.int64) * stride_vh + offs_d[:, None] * stride_vd
    )
    bias_ptrs = (
        Bias + g.to(tl.int64) * stride_bg + h.to(tl.int64) * stride_bh + m[:, None] * stride_bm
    )
    n_end = valid_key_count(Lengths, g, N_K, HAS_LENGTHS)
    n_full = (n_end // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        dq = dq_step(
            dq,
            q,
            do,
            lse2,
            delta,
            k_ptrs,
            vt_ptrs,
            bias_ptrs,
            start_n,
            n_end,
            qk_scale,
            stride_kn,
            stride_vn,
            stride_bn,
            offs_n,
            offs_d,
            HEAD_DIM,
            HAS_BIAS,
            False,
            DOT_PRECISION,
            BLOCK_D,
        )
    if n_full < n_end:
        dq = dq_step(
            dq,
            q,
            do,
            lse2,
            delta,
            k_ptrs,
            vt_ptrs,
            bias_ptrs,
            n_full,
            n_end,
            qk_scale,
            stride_kn,
            stride_vn,
            stride_bn,
            offs_n,
            offs_d,
            HEAD_DIM,
            HAS_BIAS,
            True,
            DOT_PRECISION,
            BLOCK_D,
        )

    tl.store(
        dQ
        + h.to(tl.int64) * stride_dqh
        + (b * stride_dqb + m * stride_dqm)[:, None]
        + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(dQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def dkdv_step(
    dk,
    dv,
    k,
    v,
    Q,
    dOut,
    Lse,
    Delta,
    bias_base,
    b,
    m,
    row_ok,
    h,
    offs_n,
    offs_d,
    key_in_range,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_bm,
    stride_bn,
    num_heads,
    N_Q,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dk, dv (BLOCK_N, BLOCK_D) fp32 plus the contributions of one tile of query rows (query b,
    int64 scalar or (BLOCK_M,), token m (BLOCK_M,); row_ok (BLOCK_M,) read only when MASK_ROWS, the
    boundary tile), computed transposed: Pᵀ = exp2(k qᵀ · qk_scale - lse), dv += Pᵀ dO,
    dSᵀ = Pᵀ (v dOᵀ - delta), dk += dSᵀ q, so no P or dS tile is transposed. Rows of keys past the
    group's length are not masked here (the caller zeroes them); key_in_range (BLOCK_N,) keeps bias
    loads in bounds."""
    d_ok = offs_d < HEAD_DIM
    q_rows = b * stride_qb + m * stride_qm
    qt = load_masked(
        Q + h.to(tl.int64) * stride_qh + q_rows[None, :] + offs_d[:, None] * stride_qd,
        row_ok[None, :],
        d_ok[:, None],
        MASK_ROWS,
        HEAD_DIM != BLOCK_D,
    )
    do_rows = b * stride_gb + m * stride_gm
    do = load_masked(
        dOut + h.to(tl.int64) * stride_gh + do_rows[:, None] + offs_d[None, :] * stride_gd,
        row_ok[:, None],
        d_ok[None, :],
        MASK_ROWS,
        HEAD_DIM != BLOCK_D,
    )
    row_index = (b * num_heads + h) * N_Q + m  # of each row in Lse / Delta (B, H, Nq)
    if MASK_ROWS:
        lse = tl.load(Lse + row_index, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row_index, mask=row_ok, other=0.0)
    else:
        lse = tl.load(Lse + row_index)
        delta = tl.load(Delta + row_index)
    lse2 = lse * 1.4426950408889634
    qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if HAS_BIAS:
        bias_ok = key_in_range[:, None]
        if MASK_ROWS:
            bias_ok = bias_ok & row_ok[None, :]
        bt = tl.load(
            bias_base + m[None, :] * stride_bm + offs_n[:, None] * stride_bn,
            mask=bias_ok,
            other=0.0,
        )
        pt = tl.exp2(qkt * qk_scale + bt.to(tl.float32) * 1.4426950408889634 - lse2[None, :])
    else:
        pt = tl.exp2(qkt * qk_scale - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


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
    N_Q_BUCKET,
    N_K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: the dk, dv contributions to BLOCK_N keys of one (g, h) from one split of its
    queries. PACKED: the split's queries · N_Q rows are tiled as one M axis (as in the forward),
    only its last tile masked; else each query's rows are tiled on their own, each query's last tile
    masked.

    Launched on flat_grid(cdiv(N_K, BLOCK_N), G · H) extended by the splits on axis 1.
    Split s = program_id(1) covers queries g · QPG + s · queries_per_split onwards (QPG = B / G, the
    last split may be shorter). ATOMIC False: stores into slice s of dK / dV (stride_dks apart; a
    single split passes the (G, H, Nk, D) gradients themselves). ATOMIC True: atomically adds into
    fp32 (G, H, Nk, D) buffers. dK and dV share the strides stride_dk*. Key tiles at or past
    key_lengths[g] skip the query loop, and keys at or past it get zero rows. N_Q_BUCKET,
    N_K_BUCKET only key the autotuning.
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
    key_in_range = offs_n < N_K

    k = load_masked(
        K
        + g.to(tl.int64) * stride_kg
        + h.to(tl.int64) * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        key_ok[:, None],
        d_ok[None, :],
        True,
        HEAD_DIM != BLOCK_D,
    )
    v = load_masked(
        V
        + g.to(tl.int64) * stride_vg
        + h.to(tl.int64) * stride_vh
        + offs_n[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        key_ok[:, None],
        d_ok[None, :],
        True,
        HEAD_DIM != BLOCK_D,
    )
    bias_base = Bias + g.to(tl.int64) * stride_bg + h.to(tl.int64) * stride_bh
    split = tl.program_id(1)
    first_query = (g * queries_per_group + split * queries_per_split).to(tl.int64)
    num_queries = tl.minimum(queries_per_split, queries_per_group - split * queries_per_split)
    # No query work at all for a key tile that lies entirely past the group's length.
    has_work = start_n < n_end
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if PACKED:
        r_end = tl.where(has_work, num_queries * N_Q, 0)
        r_full = (r_end // BLOCK_M) * BLOCK_M
        for start in range(0, r_full, BLOCK_M):
            rows = start + offs_m
            dk, dv = dkdv_step(
                dk,
                dv,
                k,
                v,
                Q,
                dOut,
                Lse,
                Delta,
                bias_base,
                first_query + rows // N_Q,
                rows % N_Q,
                rows < r_end,
                h,
                offs_n,
                offs_d,
                key_in_range,
                qk_scale,
                stride_qb,
                stride_qh,
                stride_qm,
                stride_qd,
                stride_gb,
                stride_gh,
                stride_gm,
                stride_gd,
                stride_bm,
                stride_bn,
                num_heads,
                N_Q,
                HEAD_DIM,
                HAS_BIAS,
                False,
                DOT_PRECISION,
                BLOCK_D,
            )
        if r_full < r_end:
            rows = r_full + offs_m
            dk, dv = dkdv_step(
                dk,
                dv,
                k,
                v,
                Q,
                dOut,
                Lse,
                Delta,
                bias_base,
                first_query + rows // N_Q,
                rows % N_Q,
                rows < r_end,
                h,
                offs_n,
                offs_d,
                key_in_range,
                qk_scale,
                stride_qb,
                stride_qh,
                stride_qm,
                stride_qd,
                stride_gb,
                stride_gh,
                stride_gm,
                stride_gd,
                stride_bm,
                stride_bn,
                num_heads,
                N_Q,
                HEAD_DIM,
                HAS_BIAS,
                True,
                DOT_PRECISION,
                BLOCK_D,
            )
    else:
        m_end = tl.where(has_work, N_Q, 0)
        m_full = (m_end // BLOCK_M) * BLOCK_M
        for index in range(num_queries):
            b = first_query + index
            for start_m in range(0, m_full, BLOCK_M):
                rows = start_m + offs_m
                dk, dv = dkdv_step(
                    dk,
                    dv,
                    k,
                    v,
                    Q,
                    dOut,
                    Lse,
                    Delta,
                    bias_base,
                    b,
                    rows,
                    rows < N_Q,
                    h,
                    offs_n,
                    offs_d,
                    key_in_range,
                    qk_scale,
                    stride_qb,
                    stride_qh,
                    stride_qm,
                    stride_qd,
                    stride_gb,
                    stride_gh,
                    stride_gm,
                    stride_gd,
                    stride_bm,
                    stride_bn,
                    num_heads,
                    N_Q,
                    HEAD_DIM,
                    HAS_BIAS,
                    False,
                    DOT_PRECISION,
                    BLOCK_D,
                )
            if m_full < m_end:
                rows = m_full + offs_m
                dk, dv = dkdv_step(
                    dk,
                    dv,
                    k,
                    v,
                    Q,
                    dOut,
                    Lse,
                    Delta,
                    bias_base,
                    b,
                    rows,
                    rows < N_Q,
                    h,
                    offs_n,
                    offs_d,
                    key_in_range,
                    qk_scale,
                    stride_qb,
                    stride_qh,
                    stride_qm,
                    stride_qd,
                    stride_gb,
                    stride_gh,
                    stride_gm,
                    stride_gd,
                    stride_bm,
                    stride_bn,
                    num_heads,
                    N_Q,
                    HEAD_DIM,
                    HAS_BIAS,
                    True,
                    DOT_PRECISION,
                    BLOCK_D,
                )

    # Keys past the group's length met the queries as zero rows of k, v: their rows of dk, dv are
    # not gradients (and may be non-finite), so they are replaced by zeros.
    dk = tl.where(key_ok[:, None], dk, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
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


DQ_KERNEL = tiled_kernel(
    _dq_kernel, DQ_CONFIGS, key=["HEAD_DIM", "HAS_BIAS", "HAS_LENGTHS", "DOT_PRECISION"]
)
DKDV_KERNEL = tiled_kernel(
    _dkdv_kernel,
    DKDV_CONFIGS,
    key=[
        "HEAD_DIM",
        "queries_per_split",
        "HAS_BIAS",
        "HAS_LENGTHS",
        "DOT_PRECISION",
        "ATOMIC",
        "PACKED",
    ],
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
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the forward w.r.t. q, k, v.

    grad_out, out (B, H, Nq, D); q (B, H, Nq, D); k, v (G, H, Nk, D); lse (B, H, Nq) float32 from
    `attention_forward`; key_lengths, bias as in the forward. Returns contiguous dq (B, H, Nq, D),
    dk and dv (G, H, Nk, D) in the dtypes of q, k, v. `deterministic=False` adds the query splits'
    dk / dv with atomics instead of storing per-split partials that a deterministic reduction sums.
    `tf32`: TF32 dots for fp32 inputs (promptseg.kernels.triton_options). The dq kernel packs the
    B / G queries of a group into one M axis as the forward does, and the dk/dv kernel the queries
    of its split (unless PROMPTSEG_TRITON_PACK_QUERIES=0: one query at a time).

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
        DOT_PRECISION=dot_precision(q.dtype, tf32),
        HEAD_DIM=head_dim,
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

    per_set = queries_per_set(queries_per_group)
    set_rows = per_set * num_queries
    packed = per_set > 1  # the dk/dv kernel packs its split's queries like the forward
    split_rows = queries_per_split * num_queries if packed else num_queries

    def dq_grid(meta: dict) -> tuple[int]:
        return flat_grid(triton.cdiv(set_rows, meta["BLOCK_M"]), batch // per_set * heads)

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
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=DELTA_BLOCK_M,
        )
        DQ_KERNEL.launch(
            dq_grid,
            set_rows,
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
            per_set,
            sm_scale * LOG2E,
            sm_scale,
            num_queries,
            num_keys,
            *buckets(set_rows, num_keys),
            **common,
        )
        DKDV_KERNEL.launch(
            dkdv_grid,
            split_rows,
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
            *buckets(split_rows, num_keys),
            ATOMIC=atomic,
            PACKED=packed,
            **common,
        )
    if dk.dim() == 5:  # per-split partials; torch's reduction over dim 0 is deterministic
        dk, dv = dk.sum(0), dv.sum(0)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
