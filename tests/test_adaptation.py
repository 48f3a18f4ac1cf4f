"""Test-time adaptation: a copy of the model fitted to the prompts; the original never changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, tiny_checkpoint  # noqa: F401  (pytest fixture)

from promptseg.cli import main
from promptseg.data.synthetic import synthetic_task
from promptseg.engine.adaptation import Adaptation, adapt_to_prompts, adapted_parameters
from promptseg.model import PromptSegNet
from promptseg.model.loss import segmentation_loss


def prompt_set(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    task = synthetic_task(
        np.random.default_rng(seed), TINY_CONFIG.resolution, count + 1, channels=3
    )
    nonempty = task.nonempty()[:count]
    images = torch.from_numpy(np.asarray(task.images[nonempty])).float()
    images = images / 255.0 if task.images.dtype == np.uint8 else images
    maps = torch.from_numpy(np.asarray(task.masks[nonempty])).float()
    return images, maps, torch.ones(count, dtype=torch.long)


def leave_one_out_loss(
    model: PromptSegNet, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
) -> float:
    """Mean loss of predicting each prompt from all the others."""
    losses = []
    with torch.no_grad():
        for index in range(len(images)):
            keep = [j for j in range(len(images)) if j != index]
            logits = model(
                images[keep][None], maps[keep][None], types[keep][None], images[index][None]
            )
            losses.append(float(segmentation_loss(logits, maps[index][None])))
    return float(np.mean(losses))


@pytest.fixture
def model() -> PromptSegNet:
    torch.manual_seed(0)
    return PromptSegNet(TINY_CONFIG).eval()


def test_adaptation_lowers_the_prompt_set_loss_and_leaves_the_model_alone(
    model: PromptSegNet,
) -> None:
    images, maps, types = prompt_set(6)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    adapted = adapt_to_prompts(model, images, maps, types, Adaptation(steps=40, lr=0.02))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert leave_one_out_loss(adapted, images, maps, types) < leave_one_out_loss(
        model, images, maps, types
    )
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


def segmenter_pair(model: PromptSegNet, **options) -> tuple:
    from promptseg import Segmenter

    return Segmenter(model, device="cpu"), Segmenter(model, device="cpu", **options)


def test_segmenter_ensemble_averages_flipped_predictions(model: PromptSegNet) -> None:
    rng = np.random.default_rng(0)
    size = TINY_CONFIG.resolution  # at the model's own size no resizing separates the two averages
    image, query = (
        rng.random((size, size)).astype(np.float32),
        rng.random((size, size)).astype(np.float32),
    )
    mask = np.zeros((size, size), np.uint8)
    mask[10:25, 8:30] = 1
    plain, ensemble = segmenter_pair(model, ensemble=2)
    expected = (
        plain.segment([query], plain.encode_prompts([image], [mask]))
        + plain.segment(
            [query[:, ::-1].copy()],
            plain.encode_prompts([image[:, ::-1].copy()], [mask[:, ::-1].copy()]),
        )[:, :, ::-1]
    ) / 2
    got = ensemble.segment([query], ensemble.encode_prompts([image], [mask]))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    with pytest.raises(Exception, match="--ensemble"):
        segmenter_pair(model, ensemble=17)


def test_segmenter_adapts_once_per_prompt_set_and_keeps_its_model(model: PromptSegNet) -> None:
    images, maps, _ = prompt_set(3)
    as_arrays = [i.permute(1, 2, 0).numpy() for i in images]
    masks = [m.numpy().astype(np.uint8) for m in maps]
    before = {name: t.clone() for name, t in model.state_dict().items()}
    plain, adapted = segmenter_pair(model, adaptation=Adaptation(steps=10, lr=0.05))
    first = adapted.encode_prompts(as_arrays, masks)
    misses = adapted.cache.misses
    again = adapted.encode_prompts(as_arrays, masks)
    assert (
        adapted.cache.misses == misses and again.backend is first.backend
    )  # adapted once, then cached
    volume = np.stack(as_arrays, axis=2)[..., 0]
    adapted_probs = adapted.segment_volume(volume, first).probabilities
    plain_probs = plain.segment_volume(volume, plain.encode_prompts(as_arrays, masks)).probabilities
    assert not np.allclose(adapted_probs, plain_probs, atol=1e-4)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_segment_cli_with_ensemble_and_adaptation(tmp_path, tiny_checkpoint, capsys) -> None:  # noqa: F811
    from helpers import disk_example, write_png

    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        image, mask = disk_example(rng, (40, 48))
        paths.append(
            (
                write_png(tmp_path / f"i{index}.png", image),
                write_png(tmp_path / f"m{index}.png", mask),
            )
        )
    common = [
        "segment",
        "--prompt",
        str(paths[0][0]),
        str(paths[0][1]),
        "--prompt",
        str(paths[1][0]),
        str(paths[1][1]),
        "--query",
        str(paths[2][0]),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(common + ["--out", str(tmp_path / "bad"), "--ensemble", "17"]) == 2
    assert "--ensemble" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(common + ["--out", str(tmp_path / "out"), "--ensemble", "2", "--adapt", "3"]) == 0
    assert (tmp_path / "out" / "i2_mask.png").is_file()
