"""PromptSegNet: shapes, prompt-order invariance, prompt-cache equivalence, size budget,
backends."""

from __future__ import annotations

import pytest
import torch

from promptseg.kernels import cross_attention
from promptseg.model import ModelConfig, PromptSegNet, count_parameters

TINY = ModelConfig(
    resolution=32,
    widths=(8, 16, 32, 32),
    blocks_per_stage=1,
    attention_depth=1,
    head_dim=16,
    label_propagation=True,
)
ATOL = 1e-4  # float32 differences from reordering sums


def prompt_set(
    groups: int, shots: int, config: ModelConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r, c = config.resolution, config.in_channels
    images = torch.rand(groups, shots, c, r, r, generator=g)
    maps = (torch.rand(groups, shots, r, r, generator=g) > 0.5).float()
    types = torch.randint(1, 5, (groups, shots), generator=g)
    return images, maps, types


@pytest.fixture(scope="module")
def model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY).eval()


@pytest.mark.parametrize("shots", [1, 3, 8, 64])
def test_output_shape_for_several_k(model: PromptSegNet, shots: int) -> None:
    images, maps, types = prompt_set(1, shots, TINY, seed=shots)
    queries = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images, maps, types, queries)
    assert logits.shape == (3, 32, 32)
    assert torch.isfinite(logits).all()


def test_more_than_max_prompts_is_refused(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(1, 65, TINY, seed=1)
    with pytest.raises(ValueError, match="between 1 and 64"):
        model.encode_prompts(images, maps, types)


def test_prompt_order_does_not_matter(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(2, 5, TINY, seed=2)
    queries = torch.rand(4, 3, 32, 32)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(images, maps, types, queries)
        b = model(images[:, perm], maps[:, perm], types[:, perm], queries)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_prompt_cache_equals_full_forward(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(1, 4, TINY, seed=4)
    queries = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        full = model(images, maps, types, queries)
        cache = model.encode_prompts(images, maps, types)
        pieces = torch.cat([model.decode(queries[:2], cache), model.decode(queries[2:], cache)])
    torch.testing.assert_close(pieces, full, atol=ATOL, rtol=0)


def test_groups_of_different_sizes_match_separate_calls(model: PromptSegNet) -> None:
    """Two prompt sets padded to one K with num_prompts give what each gives alone."""
    images, maps, types = prompt_set(2, 4, TINY, seed=5)
    queries = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        joint = model(images, maps, types, queries, num_prompts=torch.tensor([4, 2]))
        first = model(images[:1], maps[:1], types[:1], queries[:2])
        second = model(images[1:, :2], maps[1:, :2], types[1:, :2], queries[2:])
    torch.testing.assert_close(joint, torch.cat([first, second]), atol=ATOL, rtol=0)


def test_reference_and_sdpa_backends_agree(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(1, 3, TINY, seed=6)
    queries = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        sdpa = model.set_attention_kernel("sdpa")(images, maps, types, queries)
        reference = model.set_attention_kernel("reference")(images, maps, types, queries)
    model.set_attention_kernel("sdpa")
    torch.testing.assert_close(sdpa, reference, atol=ATOL, rtol=0)


def test_one_channel_and_bottleneck_configuration() -> None:
    config = ModelConfig(
        resolution=32,
        in_channels=1,
        widths=(8, 16, 32, 32),
        blocks_per_stage=1,
        attention_depth=1,
        head_dim=16,
        bottleneck_tokens=4,
        label_propagation=False,
    )
    model = PromptSegNet(config).eval()
    images, maps, types = prompt_set(1, 3, config, seed=7)
    with torch.no_grad():
        cache = model.encode_prompts(images, maps, types)
        logits = model.decode(torch.rand(2, 1, 32, 32), cache)
    assert logits.shape == (2, 32, 32)
    assert cache.keys[0][0].shape[2] == 4  # the query attends to M latents, not K * N tokens


def test_default_configuration_stays_under_eight_million_parameters() -> None:
    assert count_parameters(PromptSegNet(ModelConfig())) < 8_000_000


def test_gradients_reach_the_prompt_side(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(1, 2, TINY, seed=8)
    model.train()
    logits = model(images, maps, types, torch.rand(2, 3, 32, 32))
    logits.mean().backward()
    model.eval()
    grads = [p.grad for p in model.prompt_encoder.tokenizers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_reference_gives_zero_rows_and_gradients_for_an_empty_group() -> None:
    q = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    out = cross_attention(q, k, k, key_lengths=torch.tensor([0, 5]), kernel="reference")
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
