"""The "vit" architecture (promptseg.model.vit): cached prompt encoding + query decoding against the
full masked sequence in float64, and the model's behaviour around the engine (order invariance,
padded groups, ensembles, checkpoints, configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptseg.model import ModelConfig, PromptSegNet, count_parameters
from promptseg.model.vit_reference import full_sequence_logits, full_sequence_mask
from promptseg.model.weights import load_model, save_weights
from promptseg.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARITY_TOL = 1e-5  # float64: cached and full-sequence paths differ only by summation order


def vit_config(bottleneck: int = 0, **changes: object) -> ModelConfig:
    """A small vit config: 32 px, patch 8 (16 tokens per image), widths 32, head dim 16."""
    fields: dict[str, object] = {
        "architecture": "vit",
        "label_propagation": False,
        "resolution": 32,
        "patch_size": 8,
        "encoder_depth": 2,
        "encoder_width": 32,
        "decoder_width": 32,
        "attention_depth": 3,
        "head_dim": 16,
        "mlp_ratio": 2.0,
        "bottleneck_tokens": bottleneck,
    }
    fields.update(changes)
    return ModelConfig(**fields)


def prompt_set(
    groups: int, shots: int, config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32
):
    """Fresh random images (G, K, C, R, R), binary maps (G, K, R, R) and prompt types (G, K)."""
    g = torch.Generator().manual_seed(seed)
    r, c = config.resolution, config.in_channels
    images = torch.rand(groups, shots, c, r, r, generator=g, dtype=dtype)
    maps = (torch.rand(groups, shots, r, r, generator=g) > 0.5).to(dtype)
    types = torch.randint(1, 5, (groups, shots), generator=g)
    return images, maps, types


def fresh_model(config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> PromptSegNet:
    """A model with random weights, LayerNorm scales and shifts and embeddings perturbed away from
    their initial values so that no term of the parity comparison is trivially zero or one."""
    torch.manual_seed(seed)
    model = PromptSegNet(config).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "roles" in name or "latents" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


@pytest.mark.parametrize("bottleneck", [0, 5])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("groups,shots,queries", [(1, 1, 1), (1, 4, 3), (2, 3, 4), (2, 6, 2)])
def test_cached_decoding_matches_full_masked_sequence_float64(
    bottleneck: int, backend: str, groups: int, shots: int, queries: int
) -> None:
    """Prompt encoding once + query decoding == the full concatenated sequence under the explicit
    mask, float64, to 1e-5; the second group (when there is one) is padded past its own prompts."""
    config = vit_config(bottleneck)
    seed = 100 * groups + 10 * shots + queries + bottleneck
    model = fresh_model(config, seed, torch.float64).set_attention_kernel(backend)
    images, maps, types = prompt_set(groups, shots, config, seed, torch.float64)
    query_images = torch.rand(
        groups * queries,
        3,
        32,
        32,
        generator=torch.Generator().manual_seed(seed + 1),
        dtype=torch.float64,
    )
    num_prompts = torch.tensor([shots, max(1, shots // 2)])[:groups]
    with torch.no_grad():
        cache = model.encode_prompts(images, maps, types, num_prompts)
        cached = model.decode(query_images, cache)
        full = full_sequence_logits(model, images, maps, types, query_images, num_prompts)
    assert cached.dtype == torch.float64 and cached.shape == (groups * queries, 32, 32)
    assert full.abs().max() > 0.1  # logits of a real signal, not a collapsed output
    torch.testing.assert_close(cached, full, atol=PARITY_TOL, rtol=0)
    expected_tokens = bottleneck if bottleneck else shots * 2 * (32 // 8) ** 2
    assert [k.shape for k in cache.keys[0]] == [(groups, 2, expected_tokens, 16)] * 3


def test_full_sequence_mask_structure() -> None:
    """Prompt rows see valid prompt tokens only; query rows see prompts and their own tokens; with
    latents, query rows see latents and themselves, never a prompt token."""
    plain = full_sequence_mask(6, torch.tensor([6, 4]), 0, 3)
    assert plain.shape == (2, 9, 9)
    assert plain[0, :6, :6].all() and not plain[0, :6, 6:].any()
    assert plain[0, 6:].all()
    assert plain[1, 6:, :4].all() and not plain[1, :, 4:6].any()
    latent = full_sequence_mask(6, torch.tensor([6]), 2, 3)[0]
    assert latent[6:8, :8].all() and not latent[6:8, 8:].any()
    assert not latent[8:, :6].any() and latent[8:, 6:].all()


def test_full_sequence_parity_detects_a_wrong_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity comparison has teeth: letting prompt rows also see the query changes the
    logits."""
    import promptseg.model.vit_reference as reference

    config = vit_config()
    model = fresh_model(config, 7, torch.float64)
    images, maps, types = prompt_set(1, 2, config, 7, torch.float64)
    queries = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    original = reference.full_sequence_mask

    def leaky(
        prompt_tokens: int, valid: torch.Tensor, latents: int, query_tokens: int
    ) -> torch.Tensor:
        mask = original(prompt_tokens, valid, latents, query_tokens).clone()
        mask[:, :prompt_tokens, prompt_tokens:] = True
        return mask

    monkeypatch.setattr(reference, "full_sequence_mask", leaky)
    with torch.no_grad():
        cached = model(images, maps, types, queries)
        wrong = full_sequence_logits(model, images, maps, types, queries)
    assert (cached - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("bottleneck", [0, 4])
def test_prompt_order_does_not_matter(bottleneck: int) -> None:
    config = vit_config(bottleneck)
    model = fresh_model(config, 3)
    images, maps, types = prompt_set(1, 5, config, 3)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(4))
    queries = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a = model(images, maps, types, queries)
        b = model(images[:, perm], maps[:, perm], types[:, perm], queries)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_prompt_cache_in_pieces_and_members_match_the_forward() -> None:
    config = vit_config()
    model = fresh_model(config, 5)
    images, maps, types = prompt_set(2, 3, config, 5)
    queries = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        cache = model.encode_prompts(images, maps, types)
        joint = model.decode(torch.cat([queries, queries]), cache)
        members = model.decode_members(queries, cache)
        first = model(images[:1], maps[:1], types[:1], queries[:2])
    torch.testing.assert_close(members.reshape(8, 32, 32), joint, atol=1e-4, rtol=0)
    torch.testing.assert_close(joint[:2], first, atol=1e-4, rtol=0)


def test_gradients_reach_encoder_embeddings_and_latents() -> None:
    model = fresh_model(vit_config(4), 6).train()
    images, maps, types = prompt_set(1, 2, model.config, 6)
    model(images, maps, types, torch.rand(2, 3, 32, 32)).square().mean().backward()
    for name in (
        "encoder.patch_embedding.weight",
        "embedding.map_embedding.weight",
        "embedding.type_embedding.weight",
        "prompt_encoder.latents",
        "blocks.0.attention.k_proj.weight",
        "query_decoder.head.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_checkpoint_round_trip_and_config_json(tmp_path: Path) -> None:
    config = vit_config(3)
    model = fresh_model(config, 8)
    save_weights(model, tmp_path / "vit.safetensors")
    restored = load_model(tmp_path / "vit.safetensors")
    assert restored.config == ModelConfig.from_json(config.to_json()) == config
    images, maps, types = prompt_set(1, 2, config, 8)
    queries = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            restored(images, maps, types, queries), model(images, maps, types, queries)
        )


def test_default_config_serialises_without_the_architecture_fields() -> None:
    """Configs of the conv design (and the shipped weights' JSON) are unchanged by the new
    fields."""
    data = ModelConfig().to_dict()
    assert not {
        "architecture",
        "patch_size",
        "encoder_depth",
        "encoder_width",
        "decoder_width",
    } & set(data)
    assert ModelConfig.from_dict(data) == ModelConfig()
    assert vit_config().to_dict()["architecture"] == "vit"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"label_propagation": True}, "no label propagation"),
        ({"patch_size": 5}, "multiple of patch_size"),
        ({"decoder_width": 40}, "decoder_width 40 is not a multiple of head_dim"),
        ({"architecture": "rnn"}, "architecture must be"),
        ({"encoder_depth": -1}, "encoder_depth must lie in"),
    ],
)
def test_invalid_vit_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vit_config(**changes)


@pytest.mark.parametrize(
    "name,low,high",
    [
        ("promptseg_vit_small", 3_000_000, 5_000_000),
        ("promptseg_vit_base", 160_000_000, 180_000_000),
    ],
)
def test_shipped_vit_configs_build(name: str, low: int, high: int) -> None:
    config = TrainConfig.load(ROOT / "configs" / f"{name}.yaml").model_config()
    assert config.architecture == "vit"
    with torch.device("meta"):
        model = PromptSegNet(config)
    assert low < count_parameters(model) < high
