"""Test-time adaptation: fit a small parameter subset of a copy of the model to one prompt set.

The K prompt pairs are their own training set: each step builds `groups` leave-one-out episodes
(one prompt image is the query, its mask the target, up to `max_context` of the other prompts the
context), and a single prompt (K = 1) is queried through an augmented copy of itself (flips and
the per-image augmentation of training). Only the affine parameters of every normalisation layer,
the output head, the prior gain and the propagation temperatures move (Adam), so a few dozen steps
cost seconds and cannot drift far. The model passed in is never changed: adaptation returns a
deep copy. Everything is drawn from `seed`, so a run is reproducible on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from promptseg.data.augment import augment_examples
from promptseg.model import PromptSegNet
from promptseg.model.loss import segmentation_loss
from promptseg.model.prompt_types import PROMPT_TYPES

MAX_ADAPT_STEPS = 500


@dataclass(frozen=True)
class Adaptation:
    """How to adapt: `steps` Adam steps at `lr`, `groups` leave-one-out episodes per step, each with
    at most `max_context` context prompts; `seed` fixes every draw."""

    steps: int
    lr: float = 0.01
    groups: int = 2
    max_context: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.steps <= MAX_ADAPT_STEPS:
            raise ValueError(f"adaptation steps must lie in 0..{MAX_ADAPT_STEPS}, got {self.steps}")
        if self.groups < 1 or self.max_context < 1 or not self.lr > 0:
            raise ValueError("adaptation groups, max_context and lr must be positive")


def adapted_parameters(model: PromptSegNet) -> list[nn.Parameter]:
    """The parameters test-time adaptation moves: normalisation scales and shifts, the output head,
    the prior gain and the label-propagation temperatures (each once)."""
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            for parameter in (module.weight, module.bias):
                chosen[id(parameter)] = parameter
    decoder = model.query_decoder
    extra = list(decoder.head.parameters())
    if model.propagations is not None:
        extra += [decoder.prior_gain] + [p.log_temperature for p in model.propagations]
    for parameter in extra:
        chosen[id(parameter)] = parameter
    return list(chosen.values())


def adapt_to_prompts(
    model: PromptSegNet,
    images: torch.Tensor,
    maps: torch.Tensor,
    types: torch.Tensor,
    adaptation: Adaptation,
) -> PromptSegNet:
    """A copy of `model` adapted to one prompt set: images (K, C, R, R) in [0, 1], maps (K, R, R)
    masks, types (K,). Sparse prompts (clicks, boxes, scribbles) are no training targets: with
    fewer than one mask prompt, or zero steps, the copy is returned unadapted. Returns the copy in
    eval mode on the model's device."""
    adapted = copy.deepcopy(model)
    masks = torch.nonzero(types == PROMPT_TYPES["mask"]).flatten()
    if adaptation.steps == 0 or len(masks) == 0:
        return adapted.eval()
    device = next(adapted.parameters()).device
    for parameter in adapted.parameters():
        parameter.requires_grad_(False)
    trainable = adapted_parameters(adapted)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=adaptation.lr)
    rng = np.random.default_rng(adaptation.seed)
    images, maps, types = images.to(device), maps.to(device), types.to(device)
    adapted.train()
    with torch.enable_grad():
        for _ in range(adaptation.steps):
            context, context_maps, context_types, queries, targets = _episodes(
                images, maps, types, masks, adaptation, rng
            )
            logits = adapted(context, context_maps, context_types, queries)
            loss = segmentation_loss(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter in adapted.parameters():
        parameter.requires_grad_(False)
    return adapted.eval()


def _episodes(
    images: torch.Tensor,
    maps: torch.Tensor,
    types: torch.Tensor,
    masks: torch.Tensor,
    adaptation: Adaptation,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, ...]:
    """`groups` leave-one-out episodes of equal context size: context images (G, k, C, R, R), maps
    (G, k, R, R), types (G, k), queries (G, C, R, R) and their masks (G, R, R)."""
    shots = images.shape[0]
    held = rng.choice(
        masks.cpu().numpy(), size=adaptation.groups, replace=len(masks) < adaptation.groups
    )
    size = max(1, min(adaptation.max_context, shots - 1))
    context, queries, targets = [], [], []
    for index in held:
        others = np.setdiff1d(np.arange(shots), [index]) if shots > 1 else np.array([index])
        context.append(torch.from_numpy(rng.choice(others, size=size, replace=len(others) < size)))
        query, target = images[index], maps[index]
        if shots == 1:  # the only prompt, queried through an augmented copy of itself
            flips = [d for d, flip in zip((-1, -2), rng.random(2) < 0.5) if flip]
            query, target = (query.flip(flips), target.flip(flips)) if flips else (query, target)
            augmented, augmented_mask = augment_examples(
                query[None].cpu(), target[None].cpu(), rng, p=0.8
            )
            query, target = augmented[0].to(images.device), augmented_mask[0].to(images.device)
        queries.append(query)
        targets.append(target)
    chosen = torch.stack(context).to(images.device)
    return images[chosen], maps[chosen], types[chosen], torch.stack(queries), torch.stack(targets)
