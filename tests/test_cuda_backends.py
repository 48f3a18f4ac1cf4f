"""CUDA-only checks of the shipped model (all skipped without a GPU): each engine backend that runs
on CUDA against eager PyTorch on the same GPU, a training step with the Triton attention against
SDPA, and bf16 autocast against float32.

Tolerances, as relative L2 error of the logits (or of the whole gradient) and Dice of the masks
(logit > 0): the float32 backends differ from eager PyTorch by summation order and by convolution
kernels (cuDNN may pick TF32 ones, 10 mantissa bits), so <= 1e-2 and Dice >= 0.99; a wrong kernel
lands near 1.0. bf16 autocast (8 mantissa bits; the label-propagation prior stays float32) gave 1e-3
and Dice 0.9999 on the CPU for these inputs, so <= 5e-2 and Dice >= 0.97.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptseg.engine.backends import backend_availability, create_backend
from promptseg.model.loss import segmentation_loss
from promptseg.model.weights import load_model, packaged_weights_path
from promptseg.train.trainer import autocast_for
from tests.helpers import disk_example

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
FP32_TOLERANCE, FP32_MIN_DICE = 1e-2, 0.99
BF16_TOLERANCE, BF16_MIN_DICE = 5e-2, 0.97


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def mask_dice(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual > 0, expected > 0
    return 2.0 * (a & b).sum().item() / max((a.sum() + b.sum()).item(), 1)


def disk_batch(
    rng: np.random.Generator, count: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` disk images (count, 3, size, size) in [0, 1] and their masks (count, size, size)."""
    examples = [disk_example(rng, (size, size)) for _ in range(count)]
    images = torch.from_numpy(np.stack([image for image, _ in examples])).float().div(255.0)
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(
        np.stack([m for _, m in examples])
    ).float()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    """Prompt images (1, 4, 3, R, R), maps (1, 4, R, R), types (1, 4), queries (6, 3, R, R), targets
    (6, R, R)."""
    rng = np.random.default_rng(0)
    size = load_model(packaged_weights_path()).config.resolution
    images, maps = disk_batch(rng, 4, size)
    queries, targets = disk_batch(rng, 6, size)
    return images[None], maps[None], torch.ones(1, 4, dtype=torch.long), queries, targets


@pytest.mark.parametrize("name", ["triton", "compile", "onnxruntime"])
def test_cuda_backend_matches_eager_torch(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
    ok, why = backend_availability(name, CUDA)
    if not ok:
        pytest.skip(why)
    images, maps, types, queries, _ = inputs
    logits = {}
    for backend_name in ("torch", name):
        backend = create_backend(backend_name, load_model(packaged_weights_path()), CUDA)
        logits[backend_name] = backend.decode(queries, backend.encode(images, maps, types))
    assert relative_error(logits[name], logits["torch"]) <= FP32_TOLERANCE
    assert mask_dice(logits[name], logits["torch"]) >= FP32_MIN_DICE


def test_triton_training_step_matches_sdpa(inputs: tuple[torch.Tensor, ...]) -> None:
    """Loss and every parameter gradient of one CE + Dice step, Triton attention against SDPA
    (float32)."""
    images, maps, types, queries, targets = (t.to(CUDA) for t in inputs)
    results = {}
    for attention in ("sdpa", "triton"):
        model = load_model(packaged_weights_path()).to(CUDA).train().set_attention_kernel(attention)
        loss = segmentation_loss(model(images, maps, types, queries), targets)
        loss.backward()
        results[attention] = (
            loss.detach(),
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]),
        )
    assert relative_error(results["triton"][0], results["sdpa"][0]) <= FP32_TOLERANCE
    assert relative_error(results["triton"][1], results["sdpa"][1]) <= FP32_TOLERANCE


def test_bf16_autocast_close_to_float32(inputs: tuple[torch.Tensor, ...]) -> None:
    """The training forward under bf16 autocast (Triton attention) against float32, and finite
    gradients."""
    images, maps, types, queries, _ = (t.to(CUDA) for t in inputs)
    model = load_model(packaged_weights_path()).to(CUDA).set_attention_kernel("triton")
    with torch.no_grad():
        expected = model(images, maps, types, queries)
    with autocast_for(CUDA, enabled=True):
        actual = model(images, maps, types, queries)
    assert relative_error(actual, expected) <= BF16_TOLERANCE
    assert mask_dice(actual, expected) >= BF16_MIN_DICE
    actual.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
