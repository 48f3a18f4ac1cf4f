"""Test-time adaptation: a copy of the model fitted to the prompts; the original never changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG

from promptseg.cli import main
from promptseg.data.synthetic import synthetic_task
from promptseg.engine.adaptation import Adaptation, adapt_to_prompts, adapted_parameters
from promptseg.model import PromptSegNet
from promptseg.train.loss import segmentation_loss


def prompt_set(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    task = synthetic_task(np.random.default_rng(seed), TINY_CONFIG.resolution, count + 1, channels=3)
    nonempty = task.nonempty()[:count]
    images = torch.from_numpy(np.asarray(task.images[nonempty])).float()
    images = images / 255.0 if task.images.dtype == np.uint8 else images
    maps = torch.from_numpy(np.asarray(task.masks[nonempty])).float()
    return images, maps, torch.ones(count, dtype=torch.long)


def leave_one_out_loss(model: PromptSegNet, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> float:
    """Mean loss of predicting each prompt from all the others."""
    losses = []
    with torch.no_grad():
        for index in range(len(images)):
            keep = [j for j in range(len(images)) if j != index]
            logits = model(images[keep][None], maps[keep][None], types[keep][None], images[index][None])
            losses.append(float(segmentation_loss(logits, maps[index][None])))
    return float(np.mean(losses))


@pytest.fixture
def model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY_CONFIG).eval()


def test_adaptation_lowers_the_prompt_set_loss_and_leaves_the_model_alone(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(6)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    adapted = adapt_to_prompts(model, images, maps, types, Adaptation(steps=40, lr=0.02))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert leave_one_out_loss(adapted, images, maps, types) < leave_one_out_loss(model, images, maps, types)
    moved = {id(p) for p in adapted_parameters(adapted)}
    for (name, original), changed in zip(model.named_parameters(), adapted.parameters()):
        if id(changed) not in moved:
            torch.testing.assert_close(changed, original, rtol=0, atol=0, msg=name)


def test_adaptation_is_deterministic_and_works_with_one_prompt(model: PromptSegNet) -> None:
    images, maps, types = prompt_set(1)
    first = adapt_to_prompts(model, images, maps, types, Adaptation(steps=5, seed=3))
    again = adapt_to_prompts(model, images, maps, types, Adaptation(steps=5, seed=3))
    for a, b in zip(first.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), model.parameters()))


def test_sparse_prompts_are_not_adapted_to(model: PromptSegNet) -> None:
    images, maps, _ = prompt_set(3)
    clicks = torch.full((3,), 2, dtype=torch.long)
    adapted = adapt_to_prompts(model, images, maps, clicks, Adaptation(steps=5))
    for a, b in zip(adapted.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_adaptation_settings_are_refused(capsys) -> None:
    with pytest.raises(ValueError, match="0..500"):
        Adaptation(steps=-1)
    assert main(["eval", "--data", ".", "--adapt", "-2"]) == 2
    assert "--adapt" in capsys.readouterr().err
    assert main(["eval", "--data", ".", "--ensemble", "0"]) == 2
    assert "--ensemble" in capsys.readouterr().err


def test_an_ensemble_of_one_is_the_plain_prediction_and_flips_average(model: PromptSegNet) -> None:
    from promptseg.eval.baselines import flip_ensemble

    images, maps, types = prompt_set(3)
    queries = images[:2]
    with torch.no_grad():
        plain = torch.sigmoid(model(images[None], maps[None], types[None], queries))
        torch.testing.assert_close(flip_ensemble(model, images, maps, types, queries, 1), plain, rtol=0, atol=1e-6)
        flipped = torch.sigmoid(model(images.flip(-1)[None], maps.flip(-1)[None], types[None], queries.flip(-1))).flip(-1)
        torch.testing.assert_close(flip_ensemble(model, images, maps, types, queries, 2), (plain + flipped) / 2,
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="1..4"):
        flip_ensemble(model, images, maps, types, queries, 5)
