"""Parity of the Triton cross-attention kernels with the float64 PyTorch reference.

Without CUDA the kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1 must be
set before triton / promptseg are imported, hence the environment line above the imports) on small
shapes in fp32 and fp16. With CUDA they run natively on larger shapes and also in bf16.
Every case checks the output and dq, dk, dv against
`reference_cross_attention(compute_dtype=float64)`; the small-key-count cases check errors relative
to max|reference|, so a wrong tail tile cannot hide under an absolute tolerance. Also here: the
launch grids stay within CUDA's per-axis limits, the backend refuses a device it cannot run on, and
the Triton version check.
"""

import os
import types
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from promptseg.kernels import cross_attention  # noqa: E402
from promptseg.kernels.reference import reference_cross_attention  # noqa: E402

triton_attention = pytest.importorskip(
    "promptseg.kernels.triton_attention", reason="triton is not installed"
)
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
# Bounds on max|error| / max|reference| for the small-key-count cases, per input dtype.
RELATIVE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(
    seed: int,
    batch: int,
    groups: int,
    heads: int,
    num_queries: int,
    num_keys: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q (B, H, Nq, D), k, v (G, H, Nk, D) and upstream gradient dO (B, H, Nq, D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (batch, heads, num_queries, head_dim),
        (groups, heads, num_keys, head_dim),
        (groups, heads, num_keys, head_dim),
        (batch, heads, num_queries, head_dim),
    ]
    q, k, v, grad = (torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype) for s in shapes)
    return q, k, v, grad


def reference_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """float64 reference output and dq, dk, dv (zero for rows of a group with no valid key)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_cross_attention(
        *leaves, key_lengths, None if bias is None else bias.double(), compute_dtype=torch.float64
    )
    out.backward(grad.double())
    return (out.detach(),) + tuple(t.grad for t in leaves)


def triton_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    key_lengths: torch.Tensor | None,
    bias: torch.Tensor | None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Triton output and dq, dk, dv (through the autograd custom op)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = triton_attention.triton_cross_attention(
        *leaves, key_lengths, bias, deterministic=deterministic
    )
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def assert_parity(
    dtype: torch.dtype,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    deterministic: bool = True,
) -> None:
    """Output and gradients of the Triton kernels equal the float64 reference within the dtype's
    tolerance."""
    actual = triton_grads(q, k, v, grad, key_lengths, bias, deterministic)
    expected = reference_grads(q, k, v, grad, key_lengths, bias)
    for name, a, e, like in zip(("out", "dq", "dk", "dv"), actual, expected, (q, q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape, name
        torch.testing.assert_close(
            a.double(), e, atol=ATOL[dtype], rtol=RTOL[dtype], msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "groups", "heads", "head_dim"),
    [(2, 2, 2, 32), (6, 2, 2, 64), (4, 1, 1, 16)],
    ids=["G==B", "B6-G2", "G1-B4"],
)
def test_ragged_shapes(
    dtype: torch.dtype, batch: int, groups: int, heads: int, head_dim: int
) -> None:
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


def assert_relative_parity(
    dtype: torch.dtype,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
) -> None:
    """max|triton - reference| <= RELATIVE[dtype] · max|reference| for the output and dq, dk, dv.

    A reference that is exactly zero (dq and dk for a single key, where the softmax is constant) is
    measured on the scale of the N(0, 1) inputs instead.
    """
    actual = triton_grads(q, k, v, grad, key_lengths, None)
    expected = reference_grads(q, k, v, grad, key_lengths, None)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        error = float((a.double() - e).abs().max()) / (float(e.abs().max()) or 1.0)
        assert error <= RELATIVE[dtype], f"{name}: max error {error:.2e} of max|reference|"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_keys", [1, 37, 65, 129])
def test_small_and_awkward_key_counts(dtype: torch.dtype, num_keys: int) -> None:
    """Key counts where the last tile is a large share of all keys (one key; 37 = 32 + 5; one past
    64 and 128), with shared groups (B / G = 3), against max|reference|; lengths ending one key
    short."""
    q, k, v, grad = make_inputs(12, 6, 2, 2, 19, num_keys, 32, dtype)
    assert_relative_parity(dtype, q, k, v, grad)
    lengths = torch.tensor([num_keys, max(num_keys - 1, 1)], device=DEVICE)
    assert_relative_parity(dtype, q, k, v, grad, key_lengths=lengths)


@pytest.mark.parametrize("head_dim", [128, 40])
def test_head_dims(head_dim: int) -> None:
    """The largest supported D, and a D that is not a power of two (padded, masked block)."""
    dtype = torch.float16
    assert_parity(dtype, *make_inputs(4, 2, 1, 1, NQ, NK, head_dim, dtype))


def test_strided_inputs_through_dispatcher() -> None:
    """Non-contiguous q / k / v (head-minor layouts) via cross_attention(kernel="triton")."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, NQ, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, NK, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, NK, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    lengths = torch.tensor([NK, 7], device=DEVICE)
    out = cross_attention(q, k, v, lengths, kernel="triton")
    expected = reference_cross_attention(q, k, v, lengths, compute_dtype=torch.float64)
    torch.testing.assert_close(
        out.double(), expected.double(), atol=ATOL[torch.float32], rtol=RTOL[torch.float32]
    )


def test_deterministic_backward_is_bit_identical() -> None:
    """Two backward passes of the default (deterministic) mode give bit-identical dk, dv; the atomic
    mode matches the reference within tolerance. The shape makes the dk/dv kernel split the 3
    queries of each group, so both modes go through their multi-split paths."""
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


def test_autotuning_keys_on_length_buckets_and_prunes_oversized_tiles() -> None:
    """Prompt counts in one power-of-two bucket share one autotuning key; tiles wider than the
    bucket are pruned (the smallest survives when none fits); the fixed tile is the first kept."""
    import triton

    from promptseg.kernels.triton_forward import fixed_config, prune_tiles, shape_bucket

    assert [shape_bucket(n) for n in (0, 1, 5, 64, 65, 3 * 256, 16 * 256)] == [
        1,
        1,
        8,
        64,
        128,
        1024,
        4096,
    ]
    tiles = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
        for m, n, w in [(128, 128, 8), (64, 64, 4), (32, 64, 4), (128, 32, 4), (16, 16, 2)]
    ]

    def kept(rows: int, cols: int) -> list[tuple[int, int]]:
        pruned = prune_tiles(tiles, {"N_Q_BUCKET": rows, "N_K_BUCKET": cols})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned]

    assert kept(1024, 4096) == [(128, 128), (64, 64), (32, 64), (128, 32), (16, 16)]
    assert kept(64, 4096) == [(64, 64), (32, 64), (16, 16)]
    assert kept(8, 32) == [(16, 16)]
    assert kept(1, 1) == [(16, 16)]
    assert prune_tiles(tiles[:2], {"N_Q_BUCKET": 1, "N_K_BUCKET": 1})[0].kwargs == {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
    }
    assert fixed_config(tiles, 40, 3000).kwargs == {"BLOCK_M": 64, "BLOCK_N": 64}


def test_fixed_tiles_give_bit_identical_gradients_across_processes(tmp_path: Path) -> None:
    """With PROMPTSEG_TRITON_AUTOTUNE=0 (fixed tiles) the deterministic backward gives the same bits
    in two separate processes (on a GPU the autotuned tiles may differ between processes)."""
    import subprocess
    import sys

    script = tmp_path / "grads.py"
    script.write_text(
        "import os, sys, torch\n"
        "if not torch.cuda.is_available(): os.environ['TRITON_INTERPRET'] = '1'\n"
        "from promptseg.kernels.triton_attention import triton_cross_attention\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "g = torch.Generator().manual_seed(3)\n"
        f"q = torch.randn(6, 1, {NQ}, 32, generator=g).to(dev).requires_grad_()\n"
        f"k, v = (torch.randn(2, 1, {NK}, 32, generator=g).to(dev).requires_grad_() for _ in "
        "range(2))\n"
        "triton_cross_attention(q, k, v).square().sum().backward()\n"
        "torch.save([t.grad.cpu() for t in (q, k, v)], sys.argv[1])\n"
    )
    environment = {**os.environ, "PROMPTSEG_TRITON_AUTOTUNE": "0"}
    runs = []
    for index in range(2):
        path = tmp_path / f"grads{index}.pt"
        subprocess.run(
            [sys.executable, str(script), str(path)], check=True, env=environment, timeout=600
        )
        runs.append(torch.load(path))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_torch_compile_and_export() -> None:
    """The custom op traces under torch.compile (fullgraph, aot_eager) and torch.export."""
    dtype = torch.float32
    q, k, v, grad = make_inputs(7, 4, 2, 1, 17, 21, 16, dtype)
    lengths = torch.tensor([21, 9], device=DEVICE)

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return triton_attention.triton_cross_attention(q, k, v, lengths) * 2.0

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves, lengths).backward(grad)
    expected = triton_grads(q, k, v, grad * 2.0, lengths, None)
    for a, e in zip(leaves, expected[1:]):
        torch.testing.assert_close(a.grad, e, atol=0.0, rtol=0.0)

    class Attend(torch.nn.Module):
        def forward(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
        ) -> torch.Tensor:
            return triton_attention.triton_cross_attention(q, k, v, lengths)

    program = torch.export.export(Attend(), (q, k, v, lengths))
    assert "promptseg.cross_attention_fwd" in program.graph_module.code
    torch.testing.assert_close(program.module()(q, k, v, lengths), expected[0], atol=0.0, rtol=0.0)


def test_opcheck() -> None:
    """torch.library.opcheck: schema, autograd registration, fake tensor and AOT dispatch of the
    op."""
    q, k, v, _ = make_inputs(8, 4, 2, 1, 9, 11, 16, torch.float32)
    bias = torch.randn(2, 1, 1, 11, generator=torch.Generator().manual_seed(80)).to(DEVICE)
    lengths = torch.tensor([5, 11], device=DEVICE)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lengths, bias, True)
    torch.library.opcheck(torch.ops.promptseg.cross_attention_fwd.default, args)


def test_rejects_unsupported_inputs() -> None:
    """Clear errors for a bias that does not broadcast, mixed dtypes and too large a head dim."""
    q, k, v, _ = make_inputs(9, 2, 2, 1, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        triton_attention.triton_cross_attention(
            q, k, v, bias=torch.zeros(2, 1, 3, 7, device=DEVICE)
        )
    with pytest.raises(ValueError, match="dtype"):
        triton_attention.triton_cross_attention(q, k.half(), v)
    wide = torch.zeros(2, 1, 5, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        triton_attention.triton_cross_attention(wide, wide, wide)


def test_model_with_triton_backend_matches_reference_and_trains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PromptSegNet routed through the Triton kernels: same logits and gradients as the reference.

    On a GPU the model and inputs live on CUDA, with cuDNN's TF32 off so both runs are float32
    throughout."""
    from promptseg.model import ModelConfig, PromptSegNet
    from promptseg.model.loss import segmentation_loss

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    config = ModelConfig(
        resolution=32,
        widths=(8, 16, 32, 32),
        blocks_per_stage=1,
        attention_depth=1,
        head_dim=16,
        label_propagation=True,
    )
    torch.manual_seed(0)
    model = PromptSegNet(config).to(
        DEVICE
    )  # the kernels take CUDA tensors on a GPU, CPU ones under the interpreter
    g = torch.Generator().manual_seed(11)
    images, maps = (
        torch.rand(2, 3, 3, 32, 32, generator=g),
        (torch.rand(2, 3, 32, 32, generator=g) > 0.5).float(),
    )
    types, queries = torch.ones(2, 3, dtype=torch.long), torch.rand(4, 3, 32, 32, generator=g)
    targets = (torch.rand(4, 32, 32, generator=g) > 0.5).float()
    images, maps, types, queries, targets = (
        t.to(DEVICE) for t in (images, maps, types, queries, targets)
    )
    num_prompts = torch.tensor([3, 2], device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        model.set_attention_kernel(backend)
        logits = model(images, maps, types, queries, num_prompts=num_prompts)
        segmentation_loss(logits, targets).backward()
        grads = (
            model.blocks[0][0].cross_attention.k_proj.weight.grad.clone(),
            model.propagations[0].projection.weight.grad.clone(),
        )
        results[backend] = (logits.detach(), *grads)
        assert logits.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(
        results["triton"][0], results["reference"][0], atol=ATOL[torch.float32] * 10, rtol=0
    )
    for triton_grad, reference_grad in zip(results["triton"][1:], results["reference"][1:]):
        torch.testing.assert_close(
            triton_grad, reference_grad, atol=ATOL[torch.float32] * 10, rtol=1e-3
        )


class RecordingLaunch:
    """Stands in for a Triton kernel: records the grid of each launch (a callable grid evaluated at
    the smallest tile, 16, which gives the most programs) instead of running anything."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: object) -> object:
        def launch(*args: object, **kwargs: object) -> None:
            self.grids.append(
                tuple(grid({"BLOCK_M": 16, "BLOCK_N": 16}) if callable(grid) else grid)
            )

        return launch


def test_launch_grids_fit_cuda_limits_beyond_65535_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """B · H = G · H = 70,000 (more than grid axes 1 and 2 hold): every launch keeps axes 1 and 2
    within 65,535 and axis 0 within 2**31 - 1, with one program per (row, tile) on axis 0."""
    from promptseg.kernels import triton_backward, triton_forward

    kernels = {
        name: RecordingLaunch()
        for name in ("_forward_kernel", "_delta_kernel", "_dq_kernel", "_dkdv_kernel")
    }

    def recorded(name: str, real: triton_forward.TiledKernel) -> triton_forward.TiledKernel:
        return triton_forward.TiledKernel(kernels[name], kernels[name], real.configs)

    monkeypatch.setattr(
        triton_forward, "FORWARD_KERNEL", recorded("_forward_kernel", triton_forward.FORWARD_KERNEL)
    )
    monkeypatch.setattr(triton_backward, "_delta_kernel", kernels["_delta_kernel"])
    monkeypatch.setattr(
        triton_backward, "DQ_KERNEL", recorded("_dq_kernel", triton_backward.DQ_KERNEL)
    )
    monkeypatch.setattr(
        triton_backward, "DKDV_KERNEL", recorded("_dkdv_kernel", triton_backward.DKDV_KERNEL)
    )
    rows, num_queries, num_keys = 70_000, 20, 3
    q = torch.zeros(rows, 1, num_queries, 16, device=DEVICE)
    k = v = torch.zeros(rows, 1, num_keys, 16, device=DEVICE)
    out, lse = triton_forward.attention_forward(q, k, v, None, None)
    triton_backward.attention_backward(out, q, k, v, out, lse, None, None)
    query_tiles, key_tiles = -(-num_queries // 16), -(-num_keys // 16)
    expected = {
        "_forward_kernel": rows * query_tiles,
        "_dq_kernel": rows * query_tiles,
        "_delta_kernel": rows * -(-num_queries // triton_backward.DELTA_BLOCK_M),
        "_dkdv_kernel": rows * key_tiles,
    }
    for name, kernel in kernels.items():
        (grid,) = kernel.grids
        assert grid[0] == expected[name] and grid[0] <= 2**31 - 1, (name, grid)
        assert all(size <= 65_535 for size in grid[1:]), (name, grid)


def test_backend_refuses_a_device_it_cannot_run_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With CUDA present and no interpreter, a CPU device is refused in one line by the inference
    backend, by set_attention_kernel and by training; under the interpreter a CUDA device is
    refused."""
    import dataclasses

    from promptseg.engine.backends import backend_availability
    from promptseg.errors import PromptSegError
    from promptseg.kernels import default_kernel
    from promptseg.model import ModelConfig, PromptSegNet
    from promptseg.train.config import TrainConfig
    from promptseg.train.trainer import train

    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = backend_availability("triton", "cpu")
    assert not ok and "not cpu" in why and "\n" not in why
    assert backend_availability("triton", "cuda") == (True, "") and default_kernel("cpu") == "sdpa"
    model = PromptSegNet(
        ModelConfig(
            resolution=32,
            widths=(8, 16, 32, 32),
            head_dim=16,
            attention_depth=1,
            blocks_per_stage=1,
        )
    )
    with pytest.raises(
        PromptSegError, match="attention kernel 'triton' cannot run on cpu"
    ) as caught:
        model.set_attention_kernel("triton")
    assert "\n" not in str(caught.value) and model.attention_kernel == "sdpa"
    tiny = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml")
    with pytest.raises(PromptSegError, match="attention kernel 'triton' cannot run on cpu"):
        train(
            dataclasses.replace(tiny, attention_kernel="triton", steps=1),
            [],
            tmp_path,
            device="cpu",
            progress=False,
        )

    monkeypatch.setattr(triton_attention, "INTERPRET", True)
    assert backend_availability("triton", "cpu") == (True, "")
    ok, why = backend_availability("triton", "cuda")
    assert not ok and "TRITON_INTERPRET=1" in why
    assert model.set_attention_kernel("triton").attention_kernel == "triton"


@pytest.mark.parametrize(
    ("version", "knobs", "ok"),
    [
        ("3.4.0", True, True),
        ("3.9.1+git1234", True, True),
        ("4.0.0", True, True),
        ("3.3.1", False, False),
        ("3.0.0", False, False),
        ("3.4.0", False, False),
    ],
)
def test_triton_version_check(version: str, knobs: bool, ok: bool) -> None:
    """The import-time check names the floor (3.4, which introduced triton.knobs) in one line."""
    from promptseg.kernels.triton_forward import check_triton_version

    stand_in = types.SimpleNamespace(__version__=version, **({"knobs": object()} if knobs else {}))
    if ok:
        check_triton_version(stand_in)
        return
    with pytest.raises(
        ImportError, match=r"need triton>=3\.4 \(for triton\.knobs\), found triton " + version
    ) as caught:
        check_triton_version(stand_in)
    assert "\n" not in str(caught.value)


def test_tf32_dots_stay_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 inputs with TF32 dots (the default in inference on CUDA; PROMPTSEG_TRITON_TF32=1 in
    training): output and dq, dk, dv within TF32_RELATIVE_BOUND of max|float64 reference|, the
    exact dots (PROMPTSEG_TRITON_TF32=0) within RELATIVE[float32]. On a GPU the default inference
    forward must differ from the exact one (TF32 engaged); on the CPU every mode runs exact dots."""
    from promptseg.kernels.triton_options import TF32_ENV, TF32_RELATIVE_BOUND

    dtype = torch.float32
    q, k, v, grad = make_inputs(13, 6, 2, 2, NQ, NK, 64, dtype)
    lengths = torch.tensor([NK, NK - 40], device=DEVICE)
    expected = reference_grads(q, k, v, grad, lengths, None)

    def error(actual: torch.Tensor, reference: torch.Tensor) -> float:
        return float((actual.double() - reference).abs().max() / reference.abs().max())

    monkeypatch.setenv(TF32_ENV, "1")
    trained = triton_grads(q, k, v, grad, lengths, None)
    for name, a, e in zip(("out", "dq", "dk", "dv"), trained, expected):
        assert error(a, e) <= TF32_RELATIVE_BOUND, f"{name}: {error(a, e):.2e} with TF32"
    outputs = {}
    for mode in ("auto", "0"):
        monkeypatch.setenv(TF32_ENV, mode)
        with torch.no_grad():
            outputs[mode] = triton_attention.triton_cross_attention(q, k, v, lengths)
    assert error(outputs["auto"], expected[0]) <= TF32_RELATIVE_BOUND
    assert error(outputs["0"], expected[0]) <= RELATIVE[torch.float32]
    if CUDA:
        assert not torch.equal(outputs["auto"], outputs["0"])


class PrecisionRecorder:
    """Wraps a TiledKernel: records the DOT_PRECISION of each launch, then launches it."""

    def __init__(self, name: str, real: object, seen: list[tuple[str, str]]) -> None:
        self.name, self.real, self.seen = name, real, seen

    def launch(self, *args: object, **kwargs: object) -> None:
        self.seen.append((self.name, str(kwargs["DOT_PRECISION"])))
        self.real.launch(*args, **kwargs)


def test_tf32_choice_reaches_every_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy (here answering as it would for CUDA tensors) sets DOT_PRECISION of the forward,
    dq and dk/dv launches, also through the joint (own keys) path: TF32 in inference by default,
    exact in training unless PROMPTSEG_TRITON_TF32=1, exact everywhere with 0. The TF32 path
    runs under the interpreter (which computes its dots exactly) with unchanged parity."""
    from promptseg.kernels import triton_backward, triton_forward, triton_options

    seen: list[tuple[str, str]] = []
    for module, attr in (
        (triton_forward, "FORWARD_KERNEL"),
        (triton_backward, "DQ_KERNEL"),
        (triton_backward, "DKDV_KERNEL"),
    ):
        monkeypatch.setattr(module, attr, PrecisionRecorder(attr, getattr(module, attr), seen))
    as_on_cuda = triton_options.tf32_enabled
    monkeypatch.setattr(
        triton_attention,
        "tf32_enabled",
        lambda dtype, device, training: as_on_cuda(dtype, "cuda", training),
    )
    q, k, v, grad = make_inputs(14, 4, 2, 1, 19, 37, 32, torch.float32)
    lengths = torch.tensor([37, 20], device=DEVICE)

    def run(mode: str, train: bool, joint: bool = False) -> set[tuple[str, str]]:
        monkeypatch.setenv(triton_options.TF32_ENV, mode)
        seen.clear()
        if train:
            assert_parity(torch.float32, q, k, v, grad, key_lengths=lengths)
        elif joint:
            with torch.no_grad():
                cross_attention(q, k, v, lengths, kernel="triton", own_k=q, own_v=q)
        else:
            with torch.no_grad():
                triton_attention.triton_cross_attention(q, k, v, lengths)
        return set(seen)

    all_three = ("FORWARD_KERNEL", "DQ_KERNEL", "DKDV_KERNEL")
    assert run("auto", train=False) == {("FORWARD_KERNEL", "tf32")}
    assert run("auto", train=False, joint=True) == {("FORWARD_KERNEL", "tf32")}
    assert run("0", train=False) == {("FORWARD_KERNEL", "ieee")}
    assert run("auto", train=True) == {(name, "ieee") for name in all_three}
    assert run("1", train=True) == {(name, "tf32") for name in all_three}
    monkeypatch.setenv(triton_options.TF32_ENV, "0")
    seen.clear()
    with torch.no_grad():
        triton_attention.triton_cross_attention(q.half(), k.half(), v.half(), lengths)
    assert seen == [("FORWARD_KERNEL", "tf32")]  # half inputs: the precision has no effect


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_and_unpacked_row_sets_agree(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The queries of a group packed into one M axis (default) and one query per row set
    (PROMPTSEG_TRITON_PACK_QUERIES=0) both match the reference, with tiles straddling queries
    (Nq = 19, 3 queries per group), a query-dependent bias and ragged lengths; the packed forward
    and dq launch fewer programs (G · H · cdiv(3 · Nq, tile) instead of B · H · cdiv(Nq, tile))."""
    from promptseg.kernels import triton_backward, triton_forward
    from promptseg.kernels.triton_options import PACK_ENV

    groups, heads, per_group, num_queries, num_keys = 2, 2, 3, 19, 45
    q, k, v, grad = make_inputs(
        15, groups * per_group, groups, heads, num_queries, num_keys, 40, dtype
    )
    bias = torch.randn(1, heads, num_queries, num_keys, generator=torch.Generator().manual_seed(16))
    bias = bias.to(DEVICE)
    lengths = torch.tensor([num_keys - 3, 33], device=DEVICE)
    results = {}
    for packed in ("1", "0"):
        monkeypatch.setenv(PACK_ENV, packed)
        assert_parity(dtype, q, k, v, grad, key_lengths=lengths, bias=bias)
        results[packed] = triton_grads(q, k, v, grad, lengths, bias)
        recorder = RecordingLaunch()
        monkeypatch.setattr(
            triton_forward,
            "FORWARD_KERNEL",
            triton_forward.TiledKernel(recorder, recorder, triton_forward.FORWARD_CONFIGS),
        )
        monkeypatch.setattr(
            triton_backward,
            "DQ_KERNEL",
            triton_forward.TiledKernel(recorder, recorder, triton_backward.DQ_CONFIGS),
        )
        others = RecordingLaunch()  # the delta and dk/dv launches do not depend on packing
        monkeypatch.setattr(triton_backward, "_delta_kernel", others)
        monkeypatch.setattr(
            triton_backward,
            "DKDV_KERNEL",
            triton_forward.TiledKernel(others, others, triton_backward.DKDV_CONFIGS),
        )
        out, lse = triton_forward.attention_forward(q, k, v, lengths, bias)
        triton_backward.attention_backward(out, q, k, v, out, lse, lengths, bias)
        monkeypatch.undo()
        rows = groups * heads * -(-per_group * num_queries // 16) if packed == "1" else None
        expected = rows or groups * per_group * heads * -(-num_queries // 16)
        assert [grid[0] for grid in recorder.grids] == [expected, expected]
    for packed_result, unpacked_result in zip(results["1"], results["0"]):
        torch.testing.assert_close(
            packed_result, unpacked_result, atol=ATOL[dtype], rtol=RTOL[dtype]
        )
