"""Frozen copy of promptseg/kernels/triton_forward.py as it was before issue 16 items 12-14
(commit 76c0168): the "before" of the GPU session's kernel comparison. Not used by promptseg.

Triton forward kernel of query-to-prompt cross-attention, plus the launch helpers it shares
with the backward kernels.

Shapes (the contract of `promptseg.kernels`): q (B, H, Nq, D); k, v (G, H, Nk, D) with B % G == 0,
query b reading key group b // (B // G) in place (keys are never copied per query);
key_lengths (G,) int or None; bias additive and broadcastable to (G, H, Nq, Nk) or None.
The forward returns out (B, H, Nq, D) in q's dtype and the natural-log log-sum-exp of each
score row, lse (B, H, Nq) float32, which is +inf for a row that has no valid key.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# triton.knobs (read below) first shipped in Triton 3.4 (it replaced the environment-variable reads
# of 3.3).
MIN_TRITON_VERSION = (3, 4)
# CUDA's limit on grid axis 0; axes 1 and 2 stop at 65,535, so every launch here puts its large
# product of tiles and (batch, head) rows on axis 0 (see flat_grid).
MAX_GRID_AXIS0 = 2**31 - 1
MAX_GRID_AXIS12 = 65_535


def check_triton_version(module: object) -> None:
    """ImportError (one line) unless `module` (triton) is release MIN_TRITON_VERSION or newer and
    has triton.knobs."""
    version = str(getattr(module, "__version__", "unknown"))
    parts = re.match(r"(\d+)\.(\d+)", version)
    found = (int(parts[1]), int(parts[2])) if parts else (0, 0)
    if found < MIN_TRITON_VERSION or not hasattr(module, "knobs"):
        need = ".".join(map(str, MIN_TRITON_VERSION))
        raise ImportError(
            f"promptseg's Triton kernels need triton>={need} (for triton.knobs), found triton "
            f"{version}"
        )


check_triton_version(triton)
# True when this module's kernels were built for the CPU interpreter (decided by triton.jit at
# import).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
LOG2E: float = math.log2(math.e)
MAX_HEAD_DIM = 128
# The one tile (BLOCK_M = BLOCK_N) used under the interpreter: larger tiles mean fewer emulated
# programs.
INTERPRET_TILE = 32


def is_hopper() -> bool:
    """Whether the current CUDA device has compute capability 9.x (H100/H200)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


Tile = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def tile_configs(gpu_tiles: list[Tile], hopper_tiles: list[Tile]) -> list[triton.Config]:
    """Autotuning space from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples.

    Under the interpreter a single INTERPRET_TILE tile is used: autotuning there would only multiply
    the (slow, numpy-emulated) launches; test shapes of a few dozen rows still cross block tails.
    """
    if INTERPRET:
        return [
            triton.Config(
                {"BLOCK_M": INTERPRET_TILE, "BLOCK_N": INTERPRET_TILE}, num_warps=1, num_stages=1
            )
        ]
    tiles = gpu_tiles + (hopper_tiles if is_hopper() else [])
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in tiles
    ]


# PROMPTSEG_TRITON_AUTOTUNE=0: every launch takes the fixed heuristic tile (`fixed_config`) instead
# of
# benchmarking the tiles on first use: no tuning latency, and the same tiles in every process.
AUTOTUNE_ENV = "PROMPTSEG_TRITON_AUTOTUNE"


def autotuning_enabled() -> bool:
    """Whether launches autotune their tiles (unset or anything but "0" in
    PROMPTSEG_TRITON_AUTOTUNE)."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def shape_bucket(length: int) -> int:
    """Autotuning key of a query or key count: the next power of two (1 for 0). Every prompt count
    K in one bucket reuses one tuned tile instead of re-benchmarking the tiles for each K."""
    return triton.next_power_of_2(max(int(length), 1))


def prune_tiles(
    configs: list[triton.Config], named_args: dict[str, Any], **_: Any
) -> list[triton.Config]:
    """Autotuner early_config_prune: the tiles no larger than the bucketed query count (BLOCK_M)
    and key count (BLOCK_N) need (16 at least), in their listed order; the smallest tile when none
    fits."""
    rows, cols = max(16, named_args["N_Q_BUCKET"]), max(16, named_args["N_K_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols]
    return kept or [
        min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))
    ]


def fixed_config(configs: list[triton.Config], num_queries: int, num_keys: int) -> triton.Config:
    """The heuristic tile used without autotuning: the first listed tile that `prune_tiles`
    keeps."""
    return prune_tiles(
        configs, {"N_Q_BUCKET": shape_bucket(num_queries), "N_K_BUCKET": shape_bucket(num_keys)}
    )[0]


@dataclass(frozen=True)
class TiledKernel:
    """A jitted kernel with its tile space: launched autotuned (key on the bucketed lengths, tiles
    pruned by shape) or, with autotuning off, with `fixed_config`."""

    raw: Any  # triton.JITFunction
    tuned: Any  # triton.runtime.Autotuner over `raw`
    configs: list[triton.Config]

    def launch(
        self,
        grid: Callable[[dict], tuple[int, ...]],
        num_queries: int,
        num_keys: int,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Run on `grid` with positional `args` ending in N_Q_BUCKET, N_K_BUCKET (callers append
        `buckets(num_queries, num_keys)`) and constexpr `kwargs`."""
        if autotuning_enabled():
            self.tuned[grid](*args, **kwargs)
            return
        config = fixed_config(self.configs, num_queries, num_keys)
        self.raw[grid](
            *args,
            **kwargs,
            **config.kwargs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def tiled_kernel(
    raw: Any, configs: list[triton.Config], key: list[str], **autotune: Any
) -> TiledKernel:
    """TiledKernel of jitted `raw` over `configs`; `key` names its other autotuning arguments
    (N_Q_BUCKET and N_K_BUCKET are always part of the key)."""
    tuned = triton.autotune(
        configs=configs,
        key=["N_Q_BUCKET", "N_K_BUCKET", *key],
        prune_configs_by={"early_config_prune": prune_tiles},
        **autotune,
    )(raw)
    return TiledKernel(raw, tuned, configs)


def buckets(num_queries: int, num_keys: int) -> tuple[int, int]:
    """(N_Q_BUCKET, N_K_BUCKET) launch arguments."""
    return shape_bucket(num_queries), shape_bucket(num_keys)


def head_block(head_dim: int) -> int:
    """Power-of-two block covering the head dimension D (at least 16, the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (parity with PyTorch), default
    otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@contextlib.contextmanager
def on_device(tensor: torch.Tensor) -> Iterator[None]:
    """Make the tensor's CUDA device current while kernels launch (no-op for CPU/interpreter)."""
    if tensor.is_cuda:
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield


def bias_view(
    bias: torch.Tensor | None, groups: int, heads: int, num_queries: int, num_keys: int
) -> tuple[torch.Tensor | None, tuple[int, int, int, int]]:
    """The bias as a (G, H, Nq, Nk) view (stride 0 on broadcast dims) and its strides; (None, zeros)
    without bias."""
    if bias is None:
        return None, (0, 0, 0, 0)
    full = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(
        groups, heads, num_queries, num_keys
    )
    return full, tuple(full.stride())


def lengths_view(key_lengths: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """key_lengths (G,) as int32 on the kernels' device, or None."""
    if key_lengths is None:
        return None
    return key_lengths.to(device=device, dtype=torch.int32).contiguous()


def flat_grid(tiles: int, rows: int) -> tuple[int]:
    """A 1-D launch grid of `tiles` programs for each of `rows` rows (B·H or G·H), tile index
    fastest.

    Everything sits on axis 0 (up to 2**31 - 1 programs) rather than rows on axis 1, where CUDA
    stops at 65,535; the order of programs is that of a (tiles, rows) grid, so neighbouring programs
    still share one (b, h) and its keys. ValueError when even axis 0 cannot hold them.
    """
    programs = tiles * rows
    if programs > MAX_GRID_AXIS0:
        raise ValueError(
            f"{tiles} tiles x {rows} (batch, head) rows = {programs} programs exceed CUDA's grid "
            "limit"
        )
    return (programs,)


@triton.jit
def flat_program(N, BLOCK: tl.constexpr):
    """(row, first index) of this program in a flat_grid of cdiv(N, BLOCK) tiles per row."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    return pid // tiles, (pid % tiles) * BLOCK


@triton.jit
def block_scores(
    q,
    kt,
    bias_ptrs,
    rows,
    cols,
    key_ok,
    N_Q,
    qk_scale,
    stride_bn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of a query tile q (BLOCK_M, BLOCK_D) against a transposed key tile kt (BLOCK_D,
    BLOCK_N).

    Returns (BLOCK_M, BLOCK_N) fp32 (q kᵀ · scale + bias) · log2(e), i.e. in the log2 domain
    (qk_scale = scale · log2(e)), with -inf where key_ok is False. bias_ptrs (BLOCK_M, 1) point at
    key 0 of each query row's bias; rows / cols are the absolute query / key indices of the tile.
    """
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        b = tl.load(
            bias_ptrs + cols[None, :] * stride_bn,
            mask=(rows[:, None] < N_Q) & key_ok[None, :],
            other=0.0,
        )
        s += b.to(tl.float32) * 1.4426950408889634
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def valid_key_count(Lengths, g, N_K, HAS_LENGTHS: tl.constexpr):
    """Number of valid keys of group g: min(max(key_lengths[g], 0), N_K), or N_K without lengths."""
    n_end = N_K
    if HAS_LENGTHS:
        n_end = tl.minimum(tl.maximum(tl.load(Lengths + g), 0), N_K)
    return n_end


FORWARD_CONFIGS = tile_configs(
    gpu_tiles=[(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 128, 8, 2)],
    hopper_tiles=[(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
)


@triton.jit
def _forward_kernel(
    Q,
    K,
    V,
    Bias,
    Lengths,
    Out,
    Lse,
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
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    num_heads,
    queries_per_group,
    qk_scale,
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
    """One program: BLOCK_M query rows of one (b, h); online softmax over the valid keys of group b
    // QPG.

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
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = (
        K + g.to(tl.int64) * stride_kg + h.to(tl.int64) * stride_kh + offs_d[:, None] * stride_kd
    )
    v_ptrs = (
        V + g.to(tl.int64) * stride_vg + h.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd
    )
    bias_ptrs = (
        Bias + g.to(tl.int64) * stride_bg + h.to(tl.int64) * stride_bh + offs_m[:, None] * stride_bm
    )
    n_end = valid_key_count(Lengths, g, N_K, HAS_LENGTHS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < n_end
        kt = tl.load(
            k_ptrs + cols[None, :] * stride_kn, mask=key_ok[None, :] & d_ok[:, None], other=0.0
        )
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose scores so far are all -inf (bias -inf) keeps a finite reference so exp2 gives
        # 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        v = tl.load(
            v_ptrs + cols[:, None] * stride_vn, mask=key_ok[:, None] & d_ok[None, :], other=0.0
        )
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    )
    o_ptrs = (
        Out
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


FORWARD_KERNEL = tiled_kernel(
    _forward_kernel, FORWARD_CONFIGS, key=["HEAD_DIM", "HAS_BIAS", "HAS_LENGTHS"]
)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (absent bias / key_lengths are passed as never-read placeholder
    pointers).

    q (B, H, Nq, D); k, v (G, H, Nk, D); key_lengths (G,) or None; bias broadcastable to (G, H, Nq,
    Nk) or None. Returns out (B, H, Nq, D) contiguous in q's dtype and lse (B, H, Nq) float32 (+inf
    on rows without valid keys).
    """
    batch, heads, num_queries, head_dim = q.shape
    groups, _, num_keys, _ = k.shape
    out = torch.empty((batch, heads, num_queries, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_queries), dtype=torch.float32, device=q.device)
    full_bias, bias_strides = bias_view(bias, groups, heads, num_queries, num_keys)
    lengths = lengths_view(key_lengths, q.device)

    def grid(meta: dict) -> tuple[int]:
        return flat_grid(triton.cdiv(num_queries, meta["BLOCK_M"]), batch * heads)

    with on_device(q):
        FORWARD_KERNEL.launch(
            grid,
            num_queries,
            num_keys,
            q,
            k,
            v,
            q if full_bias is None else full_bias,
            lse if lengths is None else lengths,
            out,
            lse,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *bias_strides,
            *out.stride(),
            heads,
            batch // groups,
            head_dim**-0.5 * LOG2E,
            num_queries,
            num_keys,
            head_dim,
            *buckets(num_queries, num_keys),
            HAS_BIAS=full_bias is not None,
            HAS_LENGTHS=lengths is not None,
            DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_D=head_block(head_dim),
        )
    return out, lse
