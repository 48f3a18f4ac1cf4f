"""Benchmark of query-to-prompt cross-attention: Triton kernels vs SDPA backends vs the reference.

Run from the repository root on a CUDA machine:

    python -m benchmarks.kernels.bench_attention            # full grid
    python -m benchmarks.kernels.bench_attention --quick    # a handful of shapes
    python -m benchmarks.kernels.bench_attention --promptseg-reference   # the PromptSeg paper's
    shapes
    python -m benchmarks.kernels.bench_attention --before-after   # issue 16 items 12-14: the
    kernels before them against now, and each change switched off on its own

--promptseg-reference times the shapes of the paper's model (issue 20,
configs/promptseg_vit_base.yaml): 12 heads of dim 64, Nq = 256 query tokens, 512 prompt tokens per
pair (image and mask tokens) for K in {1, 4, 8, 16}, one prompt set (G = 1) shared by B in {1, 4,
16, 64} queries, fp16 and bf16.

Shapes: q (B, H, Nq, D) and k, v (G, H, Nk, D) with Nk = K · Nq (K prompts of Nq tokens each, or of
--tokens-per-prompt tokens) and
B = ratio · G queries sharing each prompt set. With --ragged both (default), every shape is timed
with all keys valid and with ragged key_lengths (group g keeps Nk - 1 - g·Nk / (2G) keys); SDPA then
gets the padded keys plus an additive mask, which its flash backend does not accept (reported n/a).

Providers: the Triton kernels (deterministic backward, and the atomic backward when B > G), SDPA
through `promptseg.kernels.sdpa` under each explicit `sdpa_kernel` backend, and the plain PyTorch
reference. Also, not in the default list: `triton_baseline` (the kernels before issue 16 items
12-14, frozen in benchmarks/kernels/baseline), `triton_ieee` (exact fp32 dots,
PROMPTSEG_TRITON_TF32=0; fp32 only) and `triton_unpacked` (one query per row set,
PROMPTSEG_TRITON_PACK_QUERIES=0; B > G only). --before-after times those against `triton` with
fixed tiles (PROMPTSEG_TRITON_AUTOTUNE=0, so every provider runs the same tile and no autotuning
time is spent) on Nq 80 (unpacked, each query's second 64-row tile holds 16 rows; packed, the 8
queries' 640 rows fill ten tiles) and 1024, K 16, D 64, fp16 and fp32, B/G 8. fp32 `triton`
inference uses TF32 dots (the default), its backward exact ones.
Times are medians of `triton.testing.do_bench`; TFLOP/s count useful work only:
forward 4 · H · Nq · D · Σ_b valid_keys(b) (= 4·B·H·Nq·Nk·D without ragged lengths), backward 2.5x.
Shapes whose forward exceeds --max-tflop are left out; a provider whose estimated memory exceeds
--max-gib is recorded as "skip". Results go to
benchmarks/results/kernels-<gpu-name>[-promptseg-reference][-before-after].json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from promptseg.kernels.reference import reference_cross_attention
from promptseg.kernels.sdpa import sdpa_cross_attention

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
HEADS = 8
GROUPS = 2

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor
]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark problem: q (groups·ratio, heads, nq, dim), k / v (groups, heads, prompts·n,
    dim) with n = per_prompt tokens per prompt (0: n = nq)."""

    nq: int
    prompts: int
    dim: int
    dtype: str
    ratio: int
    ragged: bool
    groups: int = GROUPS
    heads: int = HEADS
    per_prompt: int = 0

    @property
    def nk(self) -> int:
        return self.prompts * (self.per_prompt or self.nq)

    @property
    def batch(self) -> int:
        return self.groups * self.ratio

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def key_lengths(self) -> list[int]:
        """Valid keys per group: all of them, or ragged (the first ends one key short of a tile)."""
        if not self.ragged:
            return [self.nk] * self.groups
        return [self.nk - 1 - (g * self.nk) // (2 * self.groups) for g in range(self.groups)]

    def forward_flops(self) -> float:
        """Useful forward FLOPs: 4 · H · Nq · D per (query, valid key) pair, summed over the
        batch."""
        return 4.0 * self.heads * self.nq * self.dim * self.ratio * sum(self.key_lengths())

    def label(self) -> str:
        return (
            f"Nq={self.nq} K={self.prompts}{f' n={self.per_prompt}' if self.per_prompt else ''} "
            f"D={self.dim} "
            f"H={self.heads} {self.dtype} B/G={self.ratio}{' ragged' if self.ragged else ''}"
        )


def element_bytes(shape: Shape) -> int:
    return torch.finfo(shape.torch_dtype).bits // 8


def estimated_gib(provider: str, shape: Shape) -> float:
    """Rough peak memory of forward + backward: tensors and their gradients, plus what the provider
    adds.

    SDPA copies k, v per query when G > 1 (expand_groups); math and the reference materialise the
    (B, H, Nq, Nk) scores in fp32 a few times over (scores, probabilities, their gradients).
    """
    size = element_bytes(shape)
    q_side = shape.batch * shape.heads * shape.nq * shape.dim * size
    kv_side = shape.groups * shape.heads * shape.nk * shape.dim * size
    total = 4 * q_side + 4 * kv_side  # q, out, dO, dq and k, v, dk, dv
    if provider.startswith("sdpa") and shape.groups > 1:
        total += 4 * shape.ratio * kv_side  # expanded k, v and their gradients
    if provider in ("sdpa_math", "reference"):
        total += 4 * shape.batch * shape.heads * shape.nq * shape.nk * 4
    return total / 2**30


def triton_provider(deterministic: bool) -> AttentionFn:
    from promptseg.kernels.triton_attention import triton_cross_attention

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None
    ) -> torch.Tensor:
        return triton_cross_attention(q, k, v, lengths, deterministic=deterministic)

    return run


def sdpa_provider(backend: SDPBackend) -> AttentionFn:
    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None
    ) -> torch.Tensor:
        with sdpa_kernel(backend):
            return sdpa_cross_attention(q, k, v, lengths)

    return run


def reference_provider(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None
) -> torch.Tensor:
    return reference_cross_attention(q, k, v, lengths)


def baseline_provider() -> AttentionFn:
    from benchmarks.kernels.baseline import baseline_cross_attention

    return baseline_cross_attention


PROVIDERS: dict[str, Callable[[], AttentionFn]] = {
    "triton": lambda: triton_provider(deterministic=True),
    "triton_atomic": lambda: triton_provider(deterministic=False),
    "sdpa_flash": lambda: sdpa_provider(SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": lambda: sdpa_provider(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_cudnn": lambda: sdpa_provider(SDPBackend.CUDNN_ATTENTION),
    "sdpa_math": lambda: sdpa_provider(SDPBackend.MATH),
    "reference": lambda: reference_provider,
    "triton_baseline": baseline_provider,
    "triton_ieee": lambda: triton_provider(deterministic=True),
    "triton_unpacked": lambda: triton_provider(deterministic=True),
}
DEFAULT_PROVIDERS = list(PROVIDERS)[:7]
BEFORE_AFTER_PROVIDERS = ["triton", "triton_baseline", "triton_unpacked", "triton_ieee"]
# Environment each provider runs under (forward and backward): one change of issue 16 switched off.
PROVIDER_ENV = {
    "triton_ieee": {"PROMPTSEG_TRITON_TF32": "0"},
    "triton_unpacked": {"PROMPTSEG_TRITON_PACK_QUERIES": "0"},
}


@contextlib.contextmanager
def provider_environment(provider: str) -> Iterator[None]:
    """Set the provider's PROVIDER_ENV variables while it runs, then restore them."""
    saved = {name: os.environ.get(name) for name in PROVIDER_ENV.get(provider, {})}
    os.environ.update(PROVIDER_ENV.get(provider, {}))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_inputs(
    shape: Shape, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random q, k, v, upstream gradient dO (all CUDA, shape.dtype) and key_lengths (G,) or None."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    opts = {"device": "cuda", "dtype": shape.torch_dtype, "generator": gen}
    q = torch.randn(shape.batch, shape.heads, shape.nq, shape.dim, **opts)
    k = torch.randn(shape.groups, shape.heads, shape.nk, shape.dim, **opts)
    v = torch.randn(shape.groups, shape.heads, shape.nk, shape.dim, **opts)
    grad = torch.randn(shape.batch, shape.heads, shape.nq, shape.dim, **opts)
    lengths = (
        torch.tensor(shape.key_lengths(), device="cuda", dtype=torch.int32)
        if shape.ragged
        else None
    )
    return q, k, v, grad, lengths


def time_forward_backward(
    fn: AttentionFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    lengths: torch.Tensor | None,
) -> tuple[float, float | None]:
    """Median forward time (ms, no autograd graph) and median backward time (ms), None if the
    backward fails."""
    from triton.testing import do_bench

    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(q, k, v, lengths), return_mode="median")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, lengths)
    try:
        bwd_ms = do_bench(
            lambda: out.backward(grad, retain_graph=True), grad_to_none=leaves, return_mode="median"
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # a backend with a forward but no backward for this case
        bwd_ms = None
    return fwd_ms, bwd_ms


def measure(provider: str, shape: Shape, max_gib: float) -> dict:
    """One result row: status "ok", "n/a" (unsupported), "skip" (over --max-gib) or "oom", with
    times and TFLOP/s."""
    row = {
        "provider": provider,
        **dataclasses.asdict(shape),
        "nk": shape.nk,
        "batch": shape.batch,
        "forward_flops": shape.forward_flops(),
        "fwd_ms": None,
        "bwd_ms": None,
        "fwd_tflops": None,
        "bwd_tflops": None,
        "status": "ok",
        "detail": "",
    }
    if provider in ("triton_atomic", "triton_unpacked") and shape.ratio == 1:
        row.update(status="n/a", detail="same as triton when B == G")
        return row
    if provider == "triton_ieee" and shape.dtype != "fp32":
        row.update(status="n/a", detail="same as triton for half inputs")
        return row
    if estimated_gib(provider, shape) > max_gib:
        row.update(
            status="skip", detail=f"needs ~{estimated_gib(provider, shape):.1f} GiB > --max-gib"
        )
        return row
    torch.cuda.empty_cache()
    q, k, v, grad, lengths = make_inputs(shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns about each backend it rejects
            with provider_environment(provider):
                fwd_ms, bwd_ms = time_forward_backward(
                    PROVIDERS[provider](), q, k, v, grad, lengths
                )
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom")
        return row
    except RuntimeError as exc:  # an SDPA backend that does not support this shape / mask / dtype
        row.update(status="n/a", detail=str(exc).splitlines()[0][:160])
        return row
    row["fwd_ms"], row["fwd_tflops"] = fwd_ms, shape.forward_flops() / (fwd_ms * 1e-3) / 1e12
    if bwd_ms is None:
        row["detail"] = "backward not supported"
    else:
        row["bwd_ms"], row["bwd_tflops"] = (
            bwd_ms,
            2.5 * shape.forward_flops() / (bwd_ms * 1e-3) / 1e12,
        )
    return row


def max_abs_error(shape: Shape, max_gib: float) -> float | None:
    """max |triton - sdpa| of the forward on this shape (efficient backend, else math), None when
    neither runs."""
    q, k, v, _, lengths = make_inputs(shape, seed=1)
    with torch.no_grad():
        out = PROVIDERS["triton"]()(q, k, v, lengths)
    for name, backend in (
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa_math", SDPBackend.MATH),
    ):
        if estimated_gib(name, shape) > max_gib:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    expected = sdpa_provider(backend)(q, k, v, lengths)
        except (RuntimeError, torch.cuda.OutOfMemoryError):
            continue
        return (out.float() - expected.float()).abs().max().item()
    return None


def shape_grid(args: argparse.Namespace) -> list[Shape]:
    """Every combination of the requested axes whose forward stays under --max-tflop."""
    ragged = {"yes": [True], "no": [False], "both": [False, True]}[args.ragged]
    shapes = [
        Shape(nq, prompts, dim, dtype, ratio, rag, args.groups, args.heads, args.tokens_per_prompt)
        for nq, prompts, dim, dtype, ratio, rag in itertools.product(
            args.nq, args.prompts, args.dims, args.dtypes, args.ratios, ragged
        )
    ]
    return [s for s in shapes if s.forward_flops() <= args.max_tflop * 1e12]


def format_cell(row: dict, phase: str) -> str:
    if row["status"] != "ok":
        return row["status"]
    ms, tflops = row[f"{phase}_ms"], row[f"{phase}_tflops"]
    return "n/a" if ms is None else f"{ms:.3f} ms ({tflops:.0f})"


def markdown(rows: list[dict], providers: list[str], header: str) -> str:
    """Two tables (forward, backward): one line per shape, one column per provider, "ms
    (TFLOP/s)"."""
    by_shape: dict[str, dict[str, dict]] = {}
    errors: dict[str, float | None] = {}
    for row in rows:
        by_shape.setdefault(row["label"], {})[row["provider"]] = row
        errors[row["label"]] = row.get("triton_max_abs_err")
    lines = [header, ""]
    for phase, title in (("fwd", "Forward"), ("bwd", "Backward (2.5x forward FLOPs)")):
        lines += [
            f"## {title}: median time (TFLOP/s); - = not run for this shape",
            "",
            "| shape | " + " | ".join(providers) + " |",
            "|---" * (len(providers) + 1) + "|",
        ]
        for label, cells in by_shape.items():
            lines.append(
                f"| {label} | "
                + " | ".join(format_cell(cells[p], phase) if p in cells else "-" for p in providers)
                + " |"
            )
        lines.append("")
    lines += [
        "## Triton forward vs SDPA: max abs difference",
        "",
        "| shape | max abs diff |",
        "|---|---|",
    ]
    lines += [
        f"| {label} | {'n/a' if err is None else f'{err:.2e}'} |" for label, err in errors.items()
    ]
    return "\n".join(lines) + "\n"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nq", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[1, 4, 16, 64], help="K; Nk = K * Nq"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--dtypes", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "bf16"]
    )
    parser.add_argument("--ratios", type=int, nargs="+", default=[1, 8, 32], help="B / G")
    parser.add_argument("--ragged", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--groups", type=int, default=GROUPS, help="G, key groups (prompt sets)")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument(
        "--tokens-per-prompt", type=int, default=0, help="n, Nk = K * n (0: n = Nq)"
    )
    parser.add_argument(
        "--providers", nargs="+", choices=list(PROVIDERS), default=DEFAULT_PROVIDERS
    )
    parser.add_argument(
        "--fixed-tiles",
        action="store_true",
        help="no autotuning: every Triton provider runs its fixed heuristic tile",
    )
    parser.add_argument(
        "--before-after",
        action="store_true",
        help="issue 16: triton against the kernels before it and each change off, fixed tiles",
    )
    parser.add_argument(
        "--max-gib", type=float, default=40.0, help="skip a provider whose estimate exceeds this"
    )
    parser.add_argument(
        "--max-tflop", type=float, default=50.0, help="leave out shapes with a larger forward"
    )
    parser.add_argument(
        "--quick", action="store_true", help="Nq 1024, K 1 and 16, D 64, fp16, B/G 1 and 8"
    )
    parser.add_argument(
        "--promptseg-reference",
        action="store_true",
        help="the PromptSeg paper's shapes: H 12, D 64, Nq 256, n 512, K 1/4/8/16, G 1, B 1-64",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.nq, args.prompts, args.dims, args.dtypes, args.ratios = (
            [1024],
            [1, 16],
            [64],
            ["fp16"],
            [1, 8],
        )
    if args.before_after:
        args.nq, args.prompts, args.dims, args.dtypes = [80, 1024], [16], [64], ["fp16", "fp32"]
        args.ratios, args.ragged, args.providers = [8], "no", BEFORE_AFTER_PROVIDERS
        args.fixed_tiles = True
    if args.promptseg_reference:
        args.nq, args.prompts, args.dims, args.dtypes = [256], [1, 4, 8, 16], [64], ["fp16", "bf16"]
        args.tokens_per_prompt, args.heads, args.groups, args.ratios = 512, 12, 1, [1, 4, 16, 64]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention: no CUDA GPU available; the attention benchmark needs one.")
    from promptseg.kernels.triton_attention import INTERPRET

    if INTERPRET:
        sys.exit(
            "bench_attention: TRITON_INTERPRET is set; unset it to benchmark the compiled kernels."
        )
    if args.fixed_tiles:
        os.environ["PROMPTSEG_TRITON_AUTOTUNE"] = "0"
    gpu = torch.cuda.get_device_name()
    shapes = shape_grid(args)
    print(f"{gpu}: {len(shapes)} shapes x {len(args.providers)} providers", file=sys.stderr)
    rows = []
    for shape in shapes:
        err = max_abs_error(shape, args.max_gib)
        for provider in args.providers:
            row = measure(provider, shape, args.max_gib)
            row.update(label=shape.label(), triton_max_abs_err=err)
            rows.append(row)
            print(
                f"{shape.label():<45} {provider:<15} {format_cell(row, 'fwd'):>22} "
                f"{format_cell(row, 'bwd'):>22}",
                file=sys.stderr,
            )

    import triton

    meta = {
        "gpu": gpu,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    header = (
        f"# Cross-attention kernels on {gpu} (sm {meta['capability']}, torch {meta['torch']}, "
        f"triton {meta['triton']})\n\nH={args.heads}, G={args.groups}, "
        f"Nk = K·{args.tokens_per_prompt or 'Nq'}, B = G·(B/G). "
        f"TFLOP/s count valid keys only (forward 4·H·Nq·D·Σ_b valid keys, backward 2.5x). "
        f"n/a = backend does not support the case, skip = over --max-gib {args.max_gib}."
    )
    table = markdown(rows, args.providers, header)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    preset = "-promptseg-reference" if args.promptseg_reference else ""
    preset += "-before-after" if args.before_after else ""
    stem = args.out_dir / f"kernels-{gpu_slug(gpu)}{preset}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
