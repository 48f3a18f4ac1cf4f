"""The fast training path: bf16 autocast with the propagation prior and CPU attention kept in
float32, warm starts from a weights file with a cumulative compute record, and resume with
hardness-weighted task draws."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from promptseg.data.tasks import ArrayTask
from promptseg.errors import CheckpointError
from promptseg.kernels.reference import reference_cross_attention
from promptseg.kernels.sdpa import sdpa_cross_attention
from promptseg.model import PromptSegNet
from promptseg.model.propagation import LabelPropagation
from promptseg.model.weights import read_training_record, read_weights, save_weights
from promptseg.train.config import TrainConfig
from promptseg.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig.load(REPO / "configs" / "tiny_test.yaml")


def test_propagation_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = LabelPropagation(32, 16)
    tokens, prompt_tokens = torch.randn(2, 12, 32), torch.randn(3, 12, 32)
    pos = torch.randn(12, 32)
    fractions = torch.rand(3, 12)
    k, v = layer.prompt_keys(prompt_tokens, pos, fractions, groups=1)
    expected = layer(tokens, pos, k, v, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k16, v16 = layer.prompt_keys(prompt_tokens.bfloat16(), pos, fractions, groups=1)
        got = layer(tokens.bfloat16(), pos, k16, v16, None)
    assert k16.dtype == torch.float32 and got.dtype == torch.float32
    # Only the bf16 rounding of the input tokens separates the two (logits reach the temperature,
    # 150).
    torch.testing.assert_close(got, expected, atol=0.08, rtol=0)


def test_cpu_sdpa_computes_half_inputs_in_float32() -> None:
    """bf16 q, k, v on the CPU: the result is bf16 and within bf16 rounding of a float64
    reference."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(4, 2, 10, 16, generator=generator)
    k = torch.randn(2, 2, 30, 16, generator=generator)
    v = torch.randn(2, 2, 30, 16, generator=generator)
    lengths = torch.tensor([30, 7])
    out = sdpa_cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths)
    assert out.dtype == torch.bfloat16
    expected = reference_cross_attention(
        q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), lengths
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_bf16_training_step_lowers_the_loss_like_float32(tmp_path: Path) -> None:
    """The same 60 steps in float32 and in bf16 autocast (where this CPU has bf16; float32 again
    elsewhere): both lower the loss, and their mean losses agree within 10 %."""
    config = dataclasses.replace(
        TINY,
        steps=60,
        warmup_steps=5,
        checkpoint_every=1000,
        lr=0.004,
        task_augment=False,
        image_augment=False,
        sparse_fraction=0.0,
    )
    means = []
    for precise in (False, True):
        run = tmp_path / f"mp{precise}"
        train(
            dataclasses.replace(config, mixed_precision=precise),
            [],
            run,
            device="cpu",
            progress=False,
        )
        losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert np.mean(losses[-15:]) < np.mean(losses[:15])
        means.append(np.mean(losses[-30:]))
    assert abs(means[1] - means[0]) < 0.1 * means[0]


def test_init_warm_starts_and_accumulates_compute(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, steps=4, checkpoint_every=2)
    train(config, [], tmp_path / "first", device="cpu", progress=False)
    first = tmp_path / "first" / "final.safetensors"
    record = read_training_record(first)
    assert record["episodes"] == 4 * config.episodes_per_step and record["core_hours"] > 0
    trainer = Trainer(config, [], tmp_path / "second", progress=False, init=first)
    _, tensors = read_weights(first)
    for name, tensor in trainer.model.state_dict().items():
        if name in tensors:
            torch.testing.assert_close(tensor, tensors[name].float(), rtol=0, atol=0)
    trainer.run()
    second = read_training_record(tmp_path / "second" / "final.safetensors")
    assert second["episodes"] == 2 * record["episodes"]
    assert len(second["runs"]) == 2 and second["core_hours"] > record["core_hours"]


def test_init_refuses_weights_of_another_config(tmp_path: Path) -> None:
    other = dataclasses.replace(TINY.model_config(), head_dim=8)
    path = tmp_path / "other.safetensors"
    save_weights(PromptSegNet(other), path)
    with pytest.raises(CheckpointError, match="another model config"):
        Trainer(TINY, [], tmp_path / "run", progress=False, init=path)


def test_init_may_switch_how_the_prior_reads_sparse_prompts(tmp_path: Path) -> None:
    """sparse_unknown changes no tensor: weights trained without it warm-start a recipe with it,
    load exactly, and the new run's weights carry the recipe's setting."""
    path = tmp_path / "plain.safetensors"
    save_weights(PromptSegNet(TINY.model_config()), path)
    model = dataclasses.replace(TINY.model_config(), sparse_unknown=True)
    config = dataclasses.replace(TINY, steps=2, checkpoint_every=2, model=model.to_dict())
    trainer = Trainer(config, [], tmp_path / "run", progress=False, init=path)
    _, tensors = read_weights(path)
    for name, tensor in trainer.model.state_dict().items():
        if name in tensors:
            torch.testing.assert_close(tensor, tensors[name].float(), rtol=0, atol=0)
    trainer.run()
    assert read_weights(tmp_path / "run" / "final.safetensors")[0].sparse_unknown


def test_resume_with_hardness_weighted_draws_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 1, 32, 32), dtype=np.uint8)
    masks = np.zeros((8, 32, 32), bool)
    masks[:, 8:20, 6:24] = True
    thin = np.zeros_like(masks)
    thin[:, 15:17, 4:28] = True
    tasks = [ArrayTask("a/big", "a", images, masks), ArrayTask("b/thin", "b", images, thin)]
    config = dataclasses.replace(
        TINY, steps=6, checkpoint_every=2, synthetic_fraction=0.2, hardness_mix=0.8
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, tasks, straight, device="cpu", progress=False)
    train(dataclasses.replace(config, steps=4), tasks, resumed, device="cpu", progress=False)
    trainer = Trainer(config, tasks, resumed, progress=False)
    assert trainer.resume() and trainer.step == 4 and trainer.hardness.losses
    trainer.run()

    def read(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(read(resumed), read(straight), rtol=1e-4, atol=1e-5)


def test_a_run_config_written_before_the_kernel_rename_still_loads() -> None:
    """train_config.json of older runs names the attention kernel `attention_backend`."""
    from promptseg.train.config import TrainConfig

    config = TrainConfig.from_dict({"attention_backend": "sdpa", "steps": 3})
    assert config.attention_kernel == "sdpa" and config.steps == 3
