"""CPU attention at training shapes: SDPA forward + backward in float32 and bf16, flash and math
kernels.

    python -m benchmarks.train.bench_cpu_attention

Why promptseg.kernels.sdpa computes half inputs in float32 on the CPU: at the release recipe's
shapes (8 queries of 16x16 tokens, 2 heads of width 32, K * 256 prompt keys) SDPA's float32
flash kernel is faster than its bf16 one, forward and backward. Prints one row per shape.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def milliseconds(
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    dim: int,
    dtype: torch.dtype,
    kernel: SDPBackend,
    repeats: int,
) -> float:
    """Median milliseconds of one forward + backward of SDPA on random inputs."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, queries, dim, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(batch, heads, keys, dim, generator=generator).to(dtype).requires_grad_()
    v = torch.randn(batch, heads, keys, dim, generator=generator).to(dtype).requires_grad_()
    times = []
    with sdpa_kernel(kernel):
        for index in range(repeats + 3):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v).sum().backward()
            if index >= 3:
                times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[1, 2, 8], help="K (keys = K * 256)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; q (8, 2, 256, 32), k/v (8, "
        "2, K*256, 32)"
    )
    print("| K | fp32 flash ms | bf16 flash ms | fp32 math ms | bf16 math ms |")
    print("|---:|---:|---:|---:|---:|")
    for shots in args.prompts:
        cells = [
            milliseconds(8, 2, 256, 256 * shots, 32, dtype, KERNELS[kernel], args.repeats)
            for kernel in ("flash", "math")
            for dtype in (torch.float32, torch.bfloat16)
        ]
        print(f"| {shots} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
