"""Label propagation: agreement with a float64 formula, label transfer by an untrained model,
config checks and the optimiser's weight-decay groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CONFIG, disk_example

from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.layers import sincos_position_encoding
from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.propagation import (
    LabelPropagation,
    probability_logit,
    propagation_labels,
)
from promptseg.train.trainer import decay_groups


def float64_propagation(
    module: LabelPropagation,
    prompt_tokens: torch.Tensor,
    fractions: torch.Tensor,
    query_tokens: torch.Tensor,
    pos: torch.Tensor,
    valid: int,
) -> torch.Tensor:
    """Direct float64 formula for one group: softmax over the first `valid` prompt tokens of
    temperature * cosine(query, prompt) per head, times the label fractions. -> (B, H, T)."""
    m = module.double()
    heads = prompt_tokens.shape[-1] // m.head_dim

    def unit(tokens: torch.Tensor) -> torch.Tensor:
        x = m.projection(
            F.layer_norm(tokens.double(), tokens.shape[-1:], m.norm.weight, m.norm.bias)
            + pos.double()
        )
        return F.normalize(x.reshape(*x.shape[:-1], heads, m.head_dim), dim=-1)

    k = unit(prompt_tokens).reshape(-1, heads, m.head_dim)[:valid]  # (K*T, H, D)
    q = unit(query_tokens)  # (B, T, H, D)
    logits = torch.einsum("bthd,nhd->bhtn", q, k) * m.log_temperature.exp()
    return torch.softmax(logits, dim=-1) @ fractions.double().reshape(-1)[:valid]


@pytest.mark.parametrize("valid_prompts", [3, 2])
def test_propagation_matches_float64_formula(valid_prompts: int) -> None:
    torch.manual_seed(1)
    dim, head_dim, side, shots = 32, 16, 4, 3
    module = LabelPropagation(dim, head_dim, temperature=20.0)
    pos = sincos_position_encoding(side, side, dim, torch.device("cpu"), torch.float32)
    prompt_tokens = torch.randn(shots, side * side, dim)
    fractions = torch.rand(shots, side * side)
    query_tokens = torch.randn(5, side * side, dim)
    k, v = module.prompt_keys(prompt_tokens, pos, fractions, groups=1)
    lengths = torch.tensor([valid_prompts * side * side])
    got = module(query_tokens, pos, k, v, lengths)
    expected = float64_propagation(
        module, prompt_tokens, fractions, query_tokens, pos, valid_prompts * side * side
    )
    assert got.shape == (5, dim // head_dim, side * side)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)  # float32 accumulation


def test_untrained_model_transfers_the_prompt_label_to_an_identical_query() -> None:
    """With the learned head silenced, the output is the propagated label alone: a query equal to
    the prompt image gets (nearly) the prompt mask, and a prompt mask moved elsewhere moves the
    prediction with it, so the prediction follows the prompt and not the image."""
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY_CONFIG.to_dict(), "resolution": 64, "widths": (8, 16, 32, 32)})
    model = PromptSegNet(config).eval()
    with torch.no_grad():
        model.query_decoder.head.weight.zero_()
        model.query_decoder.head.bias.zero_()
    image, mask = disk_example(np.random.default_rng(0), (64, 64))
    x = torch.from_numpy(image).float().div(255).expand(3, -1, -1)
    target = torch.from_numpy(mask).float()
    types = torch.ones(1, 1, dtype=torch.long)

    def dice(prompt_mask: torch.Tensor, reference: torch.Tensor) -> float:
        with torch.no_grad():
            pred = (model(x[None, None], prompt_mask[None, None], types, x[None]) > 0).float()[0]
        return float(2 * (pred * reference).sum() / (pred.sum() + reference.sum()))

    assert dice(target, target) > 0.8
    inverse = 1.0 - target
    assert dice(inverse, inverse) > 0.8


def test_propagation_labels_leave_what_a_click_or_scribble_does_not_touch_unknown() -> None:
    """Mask and box maps give each token its label fraction; with sparse_unknown click and scribble
    maps give 1 on the tokens they touch and 0.5 (unknown) on the others, on fresh random maps."""
    rng = np.random.default_rng()
    maps = torch.from_numpy((rng.random((4, 16, 16)) < 0.05).astype(np.float32))
    types = torch.tensor([PROMPT_TYPES[name] for name in ("mask", "box", "click", "scribble")])
    labels = propagation_labels(maps, types, (4, 4))
    cells = (
        maps.reshape(4, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(4, 16, 16)
    )  # (N, token, pixel)
    fraction = cells.double().mean(dim=-1)
    touched = cells.amax(dim=-1).double()
    assert labels.shape == (4, 16)
    torch.testing.assert_close(labels[:2].double(), fraction[:2])
    torch.testing.assert_close(labels[2:].double(), 0.5 + 0.5 * touched[2:])
    # Without sparse_unknown (the shipped weights' setting) every kind reads like a mask.
    torch.testing.assert_close(
        propagation_labels(maps, types, (4, 4), sparse_unknown=False).double(), fraction
    )


def test_probability_logit_is_finite_and_inverts_sigmoid() -> None:
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    logits = probability_logit(p)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(torch.sigmoid(logits[1:4]), p[1:4])


def test_propagation_refuses_the_bottleneck() -> None:
    with pytest.raises(ValueError, match="label_propagation"):
        ModelConfig(label_propagation=True, bottleneck_tokens=8)


def test_encoding_entries_name_the_cached_pairs() -> None:
    assert ModelConfig(attention_depth=2, label_propagation=False).encoding_entries == ("b0", "b1")
    assert ModelConfig(attention_depth=2).encoding_entries == ("b0", "b1", "propagation")


def test_weight_decay_spares_scalars_biases_and_norms() -> None:
    model = PromptSegNet(TINY_CONFIG)
    decayed, spared = decay_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    spared_ids = {id(p) for p in spared["params"]}
    assert id(model.query_decoder.prior_gain) in spared_ids
    assert all(id(p.log_temperature) in spared_ids for p in model.propagations)
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))
