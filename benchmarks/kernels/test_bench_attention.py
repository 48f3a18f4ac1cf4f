"""pytest-benchmark suite of the cross-attention providers on a few representative shapes (CUDA
only).

Run from the repository root: python -m pytest benchmarks/kernels/test_bench_attention.py
The full grid, TFLOP/s tables and result files come from `python -m
benchmarks.kernels.bench_attention`.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU"
)

from bench_attention import PROVIDERS, Shape, estimated_gib, make_inputs

SHAPES = [
    Shape(nq=1024, prompts=4, dim=64, dtype="fp16", ratio=1, ragged=False),
    Shape(nq=1024, prompts=16, dim=64, dtype="fp16", ratio=8, ragged=True),
    Shape(nq=4096, prompts=4, dim=64, dtype="bf16", ratio=8, ragged=True),
    Shape(nq=256, prompts=64, dim=32, dtype="fp16", ratio=32, ragged=True),
    # The PromptSeg paper's model (issue 20): 12 heads, 512 prompt tokens per pair, 16 queries on
    # one prompt set.
    Shape(
        nq=256,
        prompts=8,
        dim=64,
        dtype="bf16",
        ratio=16,
        ragged=False,
        groups=1,
        heads=12,
        per_prompt=512,
    ),
]
BENCH_PROVIDERS = ["triton", "triton_atomic", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]
MAX_GIB = 40.0


def prepared(provider: str, shape: Shape):
    """The provider's function and inputs, or a pytest skip when it does not fit or does not support
    the shape."""
    if provider == "triton_atomic" and shape.ratio == 1:
        pytest.skip("the atomic backward equals the deterministic one when B == G")
    if estimated_gib(provider, shape) > MAX_GIB:
        pytest.skip(f"{provider} needs ~{estimated_gib(provider, shape):.0f} GiB")
    fn = PROVIDERS[provider]()
    q, k, v, grad, lengths = make_inputs(shape)
    try:
        with torch.no_grad():
            fn(q, k, v, lengths)
    except RuntimeError as exc:
        pytest.skip(f"{provider} n/a: {str(exc).splitlines()[0][:120]}")
    return fn, q, k, v, grad, lengths


@pytest.mark.parametrize("shape", SHAPES, ids=Shape.label)
@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
def test_forward(benchmark, provider: str, shape: Shape) -> None:
    fn, q, k, v, _, lengths = prepared(provider, shape)

    def run() -> None:
        with torch.no_grad():
            fn(q, k, v, lengths)
        torch.cuda.synchronize()

    benchmark.extra_info["forward_flops"] = shape.forward_flops()
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("shape", SHAPES, ids=Shape.label)
@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
def test_backward(benchmark, provider: str, shape: Shape) -> None:
    fn, q, k, v, grad, lengths = prepared(provider, shape)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward() -> tuple[tuple[torch.Tensor], dict]:
        for t in leaves:
            t.grad = None
        out = fn(*leaves, lengths)
        torch.cuda.synchronize()
        return (out,), {}

    def backward(out: torch.Tensor) -> None:
        out.backward(grad)
        torch.cuda.synchronize()

    benchmark.extra_info["backward_flops"] = 2.5 * shape.forward_flops()
    benchmark.pedantic(backward, setup=forward, rounds=20, warmup_rounds=3)
