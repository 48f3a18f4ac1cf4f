"""cross_attention with a query's own keys (own_k, own_v): every backend against a float64 softmax
over the explicitly concatenated keys, output and gradients.

Shapes are the PromptSeg reference's (12 heads of dim 64, 256 query tokens, 512 prompt tokens per
pair, K in 1..16) scaled down: head dim 64 kept, 2 heads, 19 query tokens, 24 tokens per pair,
K in {1, 4}; without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set before import).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from promptseg.kernels import cross_attention

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}  # absolute, on O(1) outputs and gradients
DEVICE = "cuda" if CUDA else "cpu"


def explicit_joint(q, k, v, key_lengths, own_k, own_v):
    """float64 softmax over [group keys (valid ones), own keys] written out from the
    concatenation."""
    batch, groups = q.shape[0], k.shape[0]
    k_all = torch.cat([k.repeat_interleave(batch // groups, 0), own_k], dim=2)
    v_all = torch.cat([v.repeat_interleave(batch // groups, 0), own_v], dim=2)
    scores = q @ k_all.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_lengths is not None:
        valid = (
            torch.arange(k.shape[2])[None, :]
            < key_lengths.repeat_interleave(batch // groups)[:, None]
        )
        keep = torch.cat([valid, torch.ones(batch, own_k.shape[2], dtype=torch.bool)], dim=1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_all


def inputs(seed, batch, groups, shots, per_pair=24, heads=2, queries=19, head_dim=64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(groups, heads, shots * per_pair, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn_like(k)
    own_k = torch.randn(batch, heads, queries, head_dim, generator=g, dtype=torch.float64)
    own_v = torch.randn_like(own_k)
    return q, k, v, own_k, own_v


def backends() -> list[str]:
    from promptseg.kernels import triton_available

    return ["reference", "sdpa"] + (["triton"] if triton_available()[0] else [])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(
    "batch,groups,shots,lengths",
    [
        (1, 1, 1, None),
        (4, 1, 4, None),
        (4, 2, 4, [4 * 24, 30]),
        (2, 2, 1, [0, 24]),
    ],
)
def test_joint_attention_matches_explicit_concatenation(
    backend, batch, groups, shots, lengths
) -> None:
    q, k, v, own_k, own_v = inputs(batch * 31 + shots, batch, groups, shots)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    expected_leaves = [t.clone().requires_grad_() for t in (q, k, v, own_k, own_v)]
    expected = explicit_joint(*expected_leaves[:3], key_lengths, *expected_leaves[3:])
    grad = torch.randn_like(expected)
    expected.backward(grad)
    dtype = torch.float64 if backend != "triton" else torch.float32
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v, own_k, own_v)]
    lengths_d = None if key_lengths is None else key_lengths.to(DEVICE)
    out = cross_attention(*leaves[:3], lengths_d, kernel=backend, own_k=leaves[3], own_v=leaves[4])
    out.backward(grad.to(DEVICE, dtype))
    torch.testing.assert_close(out.double().cpu(), expected.detach(), atol=TOL[dtype], rtol=0)
    for name, leaf, reference in zip(
        ("dq", "dk", "dv", "d_own_k", "d_own_v"), leaves, expected_leaves
    ):
        torch.testing.assert_close(
            leaf.grad.double().cpu(), reference.grad, atol=TOL[dtype], rtol=0, msg=name
        )


def test_own_keys_are_checked() -> None:
    q, k, v, own_k, own_v = inputs(0, 2, 1, 1)
    with pytest.raises(ValueError, match="together"):
        cross_attention(q, k, v, own_k=own_k)
    with pytest.raises(ValueError, match=r"\(B, H, Ns, D\)"):
        cross_attention(q, k, v, own_k=own_k[:1], own_v=own_v[:1])
    with pytest.raises(ValueError, match="bias"):
        cross_attention(q, k, v, bias=torch.zeros(1), own_k=own_k, own_v=own_v)
