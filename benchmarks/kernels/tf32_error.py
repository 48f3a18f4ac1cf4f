"""TF32 error of the attention forward and backward, emulated on the CPU (no GPU needed).

Run from the repository root: python -m benchmarks.kernels.tf32_error

Tensor cores read only the top 10 mantissa bits of fp32 operands of a TF32 dot (the kernels' PTX
has no cvt.rna.tf32, so the low 13 bits are dropped: truncation) and accumulate in fp32. This script
truncates every dot operand the Triton kernels feed to tl.dot (q, k, v and P in the forward; q, k,
v, dO, P and dS in the backward), computes the rest in float64, and prints max|error| / max|float64
reference| of out, dq, dk, dv on N(0, 1) inputs (q also scaled by 3, for peaked softmaxes). Its
largest figures justify promptseg.kernels.triton_options.TF32_RELATIVE_BOUND, which the GPU test
tests/test_triton_attention.py::test_tf32_dots_stay_within_their_bound checks on the real kernels.
"""

from __future__ import annotations

import itertools

import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded towards zero to TF32 (10 mantissa bits), returned as float64."""
    bits = x.float().contiguous().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).double()


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> list[float]:
    """Relative errors of out, dq, dk, dv (one head batch of shape (B, H, N, D)) with TF32 dots."""
    scale = q.shape[-1] ** -0.5
    qd, kd, vd, dod = q.double(), k.double(), v.double(), do.double()
    probs = torch.softmax(qd @ kd.transpose(-1, -2) * scale, -1)
    out = probs @ vd
    delta = (dod * out).sum(-1, keepdim=True)
    ds = probs * (dod @ vd.transpose(-1, -2) - delta)
    expected = (
        out,
        scale * ds @ kd,
        scale * ds.transpose(-1, -2) @ qd,
        probs.transpose(-1, -2) @ dod,
    )
    probs_t = torch.softmax(tf32(q) @ tf32(k).transpose(-1, -2) * scale, -1)
    out_t = tf32(probs_t) @ tf32(v)
    ds_t = tf32(probs_t * (tf32(do) @ tf32(v).transpose(-1, -2) - delta))
    actual = (
        out_t,
        scale * ds_t @ tf32(k),
        scale * ds_t.transpose(-1, -2) @ tf32(q),
        tf32(probs_t).transpose(-1, -2) @ tf32(do),
    )
    return [relative(a, e) for a, e in zip(actual, expected)]


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    worst = [0.0] * 4
    print("D   Nk    q-scale  out       dq        dk        dv")
    for dim, num_keys, q_scale in itertools.product((32, 64, 128), (37, 2053), (1.0, 3.0)):
        q = torch.randn(2, 2, 256, dim, generator=gen) * q_scale
        k, v = (torch.randn(2, 2, num_keys, dim, generator=gen) for _ in range(2))
        do = torch.randn(2, 2, 256, dim, generator=gen)
        found = errors(q, k, v, do)
        worst = [max(a, b) for a, b in zip(worst, found)]
        print(f"{dim:<3} {num_keys:<5} {q_scale:<8} " + "  ".join(f"{e:.2e}" for e in found))
    print("worst               " + "  ".join(f"{e:.2e}" for e in worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
