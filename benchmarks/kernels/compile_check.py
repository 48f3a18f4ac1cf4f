"""Compile the Triton attention kernels for CUDA GPUs ahead of time, on a machine without one.

Run from the repository root, without TRITON_INTERPRET (the kernels must be real jit functions):

    python -m benchmarks.kernels.compile_check           # every kernel, sm_80 and sm_90 variants
    python -m benchmarks.kernels.compile_check --quick   # one variant of each kernel (CI)

`triton.compile` with an explicit GPUTarget lowers each kernel to PTX and a cubin (Triton's bundled
ptxas) without a driver, so code that only the GPU path reaches (constexpr branches, tf32 dots,
layouts the interpreter never checks) is type-checked and compiled here. Each line reports the
compile time (near zero when Triton's cache already holds the variant) and the tensor-core
instructions in the PTX (mma.sync on sm_80, wgmma on sm_90): fp16 and TF32 dots must use them,
exact fp32 ("ieee") dots must not. Exit status 1 when a variant fails to compile or breaks that
rule. It proves compilation, not speed or results on a GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"Q", "K", "V", "Bias", "Lengths", "Out", "Lse", "dOut", "Delta", "dQ", "dK", "dV"}
FP32_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "Lengths": "*i32"}
FLOATS = {"qk_scale", "sm_scale"}


@dataclass(frozen=True)
class Variant:
    """One kernel compiled for one target: dtype of q, k, v and its constexprs."""

    kernel: str  # "forward", "dq", "dkdv" or "delta"
    arch: int  # 80 (Ampere) or 90 (Hopper)
    dtype: str  # "fp16" or "fp32"
    head_dim: int
    precision: str = "tf32"
    bias: bool = False
    atomic: bool = False
    packed: bool = True  # dk/dv only: the split's queries tiled as one M axis

    def label(self) -> str:
        extra = " bias+lengths" if self.bias else ""
        extra += " atomic" if self.atomic else ""
        extra += " unpacked" if self.kernel == "dkdv" and not self.packed else ""
        return (
            f"{self.kernel} sm_{self.arch} {self.dtype} {self.precision} D={self.head_dim}{extra}"
        )


def kernel_function(name: str) -> Any:
    from promptseg.kernels import triton_backward, triton_forward

    return {
        "forward": triton_forward._forward_kernel,
        "dq": triton_backward._dq_kernel,
        "dkdv": triton_backward._dkdv_kernel,
        "delta": triton_backward._delta_kernel,
    }[name]


def constexprs(variant: Variant) -> dict[str, Any]:
    from promptseg.kernels.triton_forward import head_block

    values: dict[str, Any] = {"HEAD_DIM": variant.head_dim, "BLOCK_D": head_block(variant.head_dim)}
    if variant.kernel == "delta":
        return {**values, "BLOCK_M": 64}
    values.update(
        HAS_BIAS=variant.bias,
        HAS_LENGTHS=variant.bias,
        DOT_PRECISION=variant.precision,
        BLOCK_M=128 if variant.kernel == "forward" else 64,
        BLOCK_N=128 if variant.kernel == "dkdv" and variant.arch == 90 else 64,
    )
    if variant.kernel == "dkdv":
        values.update(ATOMIC=variant.atomic, PACKED=variant.packed)
    return values


def signature(fn: Any, variant: Variant, values: dict[str, Any]) -> dict[str, str]:
    """Triton signature of `fn`: its pointers, int32 lengths and strides, fp32 scales."""
    pointers = dict(FP32_POINTERS)
    if variant.atomic:
        pointers.update(dK="*fp32", dV="*fp32")
    types = {}
    for name in fn.arg_names:
        if name in values:
            types[name] = "constexpr"
        elif name in POINTERS:
            types[name] = pointers.get(name, f"*{variant.dtype}")
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types


def compile_variant(variant: Variant) -> tuple[float, int]:
    """Compile one variant; (seconds, tensor-core instructions in its PTX)."""
    fn = kernel_function(variant.kernel)
    values = constexprs(variant)
    source = ASTSource(fn=fn, signature=signature(fn, variant, values), constexprs=values)
    start = time.perf_counter()
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", variant.arch, 32),
        options={"num_warps": 4, "num_stages": 3},
    )
    ptx = compiled.asm["ptx"]
    return time.perf_counter() - start, len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)", ptx))


def variants(quick: bool) -> list[Variant]:
    if quick:
        return [
            Variant("forward", 90, "fp16", 40, bias=True),
            Variant("forward", 80, "fp32", 64),
            Variant("dq", 90, "fp16", 64, bias=True),
            Variant("dkdv", 90, "fp16", 40, bias=True, atomic=True),
            Variant("delta", 90, "fp16", 40),
        ]
    found = [Variant("delta", arch, "fp16", 40) for arch in (80, 90)]
    for arch in (80, 90):
        for kernel in ("forward", "dq", "dkdv"):
            found += [
                Variant(kernel, arch, "fp16", 64),
                Variant(kernel, arch, "fp16", 40, bias=True, atomic=kernel == "dkdv"),
                Variant(kernel, arch, "fp32", 64, "tf32"),
                Variant(kernel, arch, "fp32", 40, "ieee", bias=True),
            ]
        found.append(Variant("dkdv", arch, "fp16", 64, packed=False))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one variant of each kernel")
    args = parser.parse_args(argv)
    from promptseg.kernels.triton_forward import INTERPRET

    if INTERPRET:
        sys.exit("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    failures = 0
    for variant in variants(args.quick):
        try:
            seconds, mma = compile_variant(variant)
        except Exception as error:  # noqa: BLE001 - report every variant that fails
            failures += 1
            print(f"FAIL {variant.label()}: {type(error).__name__}: {str(error)[:300]}")
            continue
        wants_mma = variant.kernel != "delta" and (
            variant.dtype != "fp32" or variant.precision == "tf32"
        )
        ok = (mma > 0) == wants_mma
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {variant.label()}: {seconds:.1f} s, {mma} MMA in PTX")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
