"""Parity of the Triton cross-attention kernels with the float64 PyTorch reference.

Without CUDA the kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1 must be
set before triton / promptseg are imported, hence the environment line above the imports) on small
shapes in fp32 and fp16. With CUDA they run natively on larger shapes and also in bf16.
Every case checks the output and dq, dk, dv against `reference_cross_attention(compute_dtype=float64)`.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from promptseg.kernels import cross_attention  # noqa: E402
from promptseg.kernels.reference import reference_cross_attention  # noqa: E402

triton_attention = pytest.importorskip("promptseg.kernels.triton_attention", reason="triton is not installed")
_OK, _WHY = triton_attention.is_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY or "triton backend unavailable")

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Absolute / relative tolerances per input dtype, for the output and for dq, dk, dv.
ATOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Realistic sizes natively on a GPU; a few dozen rows under the (slow) interpreter, still crossing
# the interpreter tile (32) with ragged tails.
NQ, NK = (1037, 2053) if CUDA else (37, 53)
TILE = 32


def make_inputs(
    seed: int, batch: int, groups: int, heads: int, num_queries: int, num_keys: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q (B, H, Nq, D), k, v (G, H, Nk, D) and upstream gradient dO (B, H, Nq, D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, num_queries, head_dim), (groups, heads, num_keys, head_dim),
              (groups, heads, num_keys, head_dim), (batch, heads, num_queries, head_dim)]
    q, k, v, grad = (torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype) for s in shapes)
    return q, k, v, grad


def reference_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
    key_lengths: torch.Tensor | None, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """float64 reference output and dq, dk, dv (zero for rows of a group with no valid key)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_cross_attention(*leaves, key_lengths, None if bias is None else bias.double(),
                                    compute_dtype=torch.float64)
    out.backward(grad.double())
    return (out.detach(),) + tuple(t.grad for t in leaves)


def triton_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
    key_lengths: torch.Tensor | None, bias: torch.Tensor | None, deterministic: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Triton output and dq, dk, dv (through the autograd custom op)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = triton_attention.triton_cross_attention(*leaves, key_lengths, bias, deterministic=deterministic)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def assert_parity(
    dtype: torch.dtype, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
    key_lengths: torch.Tensor | None = None, bias: torch.Tensor | None = None, deterministic: bool = True,
) -> None:
    """Output and gradients of the Triton kernels equal the float64 reference within the dtype's tolerance."""
    actual = triton_grads(q, k, v, grad, key_lengths, bias, deterministic)
    expected = reference_grads(q, k, v, grad, key_lengths, bias)
    for name, a, e, like in zip(("out", "dq", "dk", "dv"), actual, expected, (q, q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape, name
        torch.testing.assert_close(a.double(), e, atol=ATOL[dtype], rtol=RTOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "groups", "heads", "head_dim"),
    [(2, 2, 2, 32), (6, 2, 2, 64), (4, 1, 1, 16)],
    ids=["G==B", "B6-G2", "G1-B4"],
)
def test_ragged_shapes(dtype: torch.dtype, batch: int, groups: int, heads: int, head_dim: int) -> None:
    """Nq, Nk not multiples of the tile; shared key groups (G < B) and per-query groups (G == B)."""
    assert_parity(dtype, *make_inputs(1, batch, groups, heads, NQ, NK, head_dim, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_lengths(dtype: torch.dtype) -> None:
    """Lengths ending inside a tile, zero, exactly one full tile and the full Nk; B / G = 2."""
    q, k, v, grad = make_inputs(2, 8, 4, 1, NQ, NK, 32, dtype)
    lengths = torch.tensor([TILE - 12, 0, TILE, NK], device=DEVICE)
    assert_parity(dtype, q, k, v, grad, key_lengths=lengths)
    out = triton_attention.triton_cross_attention(q, k, v, lengths)
    assert torch.count_nonzero(out[2:4]) == 0  # queries of the empty group get zero rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", ["G,H,1,Nk", "1,H,Nq,Nk", "Nk"])
def test_bias_with_lengths(dtype: torch.dtype, bias_shape: str) -> None:
    """Additive bias in its broadcast forms (stride-0 dims), combined with ragged key lengths."""
    groups, heads = 2, 2
    q, k, v, grad = make_inputs(3, 6, groups, heads, NQ, NK, 32, dtype)
    sizes = {"G": groups, "H": heads, "Nq": NQ, "Nk": NK, "1": 1}
    gen = torch.Generator().manual_seed(30)
    bias = torch.randn([sizes[s] for s in bias_shape.split(",")], generator=gen).to(DEVICE)
    lengths = torch.tensor([NK - 5, TILE + 3], device=DEVICE)
    assert_parity(dtype, q, k, v, grad, key_lengths=lengths, bias=bias)


@pytest.mark.parametrize("head_dim", [128, 40])
def test_head_dims(head_dim: int) -> None:
    """The largest supported D, and a D that is not a power of two (padded, masked block)."""
    dtype = torch.float16
    assert_parity(dtype, *make_inputs(4, 2, 1, 1, NQ, NK, head_dim, dtype))


def test_strided_inputs_through_dispatcher() -> None:
    """Non-contiguous q / k / v (head-minor layouts) via cross_attention(backend="triton")."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, NQ, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, NK, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, NK, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    lengths = torch.tensor([NK, 7], device=DEVICE)
    out = cross_attention(q, k, v, lengths, backend="triton")
    expected = reference_cross_attention(q, k, v, lengths, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected.double(), atol=ATOL[torch.float32], rtol=RTOL[torch.float32])


def test_deterministic_backward_is_bit_identical() -> None:
    """Two backward passes of the default (deterministic) mode give bit-identical dk, dv; the atomic
    mode matches the reference within tolerance. The shape makes the dk/dv kernel split the 3 queries
    of each group, so both modes go through their multi-split paths."""
    from promptseg.kernels.triton_backward import query_splits

    dtype = torch.float32
    inputs = make_inputs(6, 6, 2, 1, NQ, NK, 32, dtype)
    lengths = torch.tensor([NK, TILE + 1], device=DEVICE)
    assert query_splits(NK, 2, 3, torch.device(DEVICE)) > 1
    first = triton_grads(*inputs, lengths, None)
    second = triton_grads(*inputs, lengths, None)
    for a, b in zip(first[2:], second[2:]):
        assert torch.equal(a, b)
    assert_parity(dtype, *inputs, key_lengths=lengths, deterministic=False)


def test_torch_compile_and_export() -> None:
    """The custom op traces under torch.compile (fullgraph, aot_eager) and torch.export."""
    dtype = torch.float32
    q, k, v, grad = make_inputs(7, 4, 2, 1, 17, 21, 16, dtype)
    lengths = torch.tensor([21, 9], device=DEVICE)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return triton_attention.triton_cross_attention(q, k, v, lengths) * 2.0

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves, lengths).backward(grad)
    expected = triton_grads(q, k, v, grad * 2.0, lengths, None)
    for a, e in zip(leaves, expected[1:]):
        torch.testing.assert_close(a.grad, e, atol=0.0, rtol=0.0)

    class Attend(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return triton_attention.triton_cross_attention(q, k, v, lengths)

    program = torch.export.export(Attend(), (q, k, v, lengths))
    assert "promptseg.cross_attention_fwd" in program.graph_module.code
    torch.testing.assert_close(program.module()(q, k, v, lengths), expected[0], atol=0.0, rtol=0.0)


def test_opcheck() -> None:
    """torch.library.opcheck: schema, autograd registration, fake tensor and AOT dispatch of the op."""
    q, k, v, _ = make_inputs(8, 4, 2, 1, 9, 11, 16, torch.float32)
    bias = torch.randn(2, 1, 1, 11, generator=torch.Generator().manual_seed(80)).to(DEVICE)
    lengths = torch.tensor([5, 11], device=DEVICE)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lengths, bias, True)
    torch.library.opcheck(torch.ops.promptseg.cross_attention_fwd.default, args)


def test_rejects_unsupported_inputs() -> None:
    """Clear errors for a bias that does not broadcast, mixed dtypes and too large a head dim."""
    q, k, v, _ = make_inputs(9, 2, 2, 1, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        triton_attention.triton_cross_attention(q, k, v, bias=torch.zeros(2, 1, 3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        triton_attention.triton_cross_attention(q, k.half(), v)
    wide = torch.zeros(2, 1, 5, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        triton_attention.triton_cross_attention(wide, wide, wide)


def test_model_with_triton_backend_matches_reference_and_trains() -> None:
    """PromptSegNet routed through the Triton kernels: same logits and gradients as the reference."""
    from promptseg.model import ModelConfig, PromptSegNet
    from promptseg.train.loss import segmentation_loss

    config = ModelConfig(resolution=32, widths=(8, 16, 32, 32), blocks_per_stage=1, attention_depth=1, head_dim=16,
                         label_propagation=True)
    torch.manual_seed(0)
    model = PromptSegNet(config)
    g = torch.Generator().manual_seed(11)
    images, maps = torch.rand(2, 3, 3, 32, 32, generator=g), (torch.rand(2, 3, 32, 32, generator=g) > 0.5).float()
    types, queries = torch.ones(2, 3, dtype=torch.long), torch.rand(4, 3, 32, 32, generator=g)
    targets = (torch.rand(4, 32, 32, generator=g) > 0.5).float()
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        model.set_attention_backend(backend)
        logits = model(images, maps, types, queries, num_prompts=torch.tensor([3, 2]))
        segmentation_loss(logits, targets).backward()
        grads = (model.blocks[0][0].cross_attention.k_proj.weight.grad.clone(),
                 model.propagations[0].projection.weight.grad.clone())
        results[backend] = (logits.detach(), *grads)
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=ATOL[torch.float32] * 10, rtol=0)
    for triton_grad, reference_grad in zip(results["triton"][1:], results["reference"][1:]):
        torch.testing.assert_close(triton_grad, reference_grad, atol=ATOL[torch.float32] * 10, rtol=1e-3)
