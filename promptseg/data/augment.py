"""Task augmentation (one random transform shared by a whole episode) and per-image augmentation.

Images are (N, C, R, R) float32 in [0, 1], masks (N, R, R) float32 in {0, 1}. Geometric parameters
are in normalised coordinates ([-1, 1] across the image) and filter widths in fractions of the image
size, so the same parameters mean the same thing at any resolution. Masks follow geometric
transforms by bilinear resampling thresholded at 0.5.

Task augmentations (PromptSeg's ten, plus both flip axes), applied in this order, each with its own
probability (TASK_AUGMENTATION_PROBS):
  hflip 0.5, vflip 0.5, affine 0.5 (rotation +-20 deg, scale 0.85-1.15, shift +-10% of the image),
  elastic 0.25 (smooth displacement, up to ~3% of the image), flip_labels 0.1 (mask -> 1 - mask),
  sobel_edge 0.1 (mask -> its 2 px morphological-gradient boundary; at most one of the two label
  ops), brightness_contrast 0.5, blur 0.2, sharpness 0.2, noise 0.25 (one noise field for the
  episode), flip_intensity 0.2 (image -> 1 - image).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

TaskOp = tuple[str, dict[str, float]]

TASK_AUGMENTATION_PROBS: dict[str, float] = {
    "hflip": 0.5,
    "vflip": 0.5,
    "affine": 0.5,
    "elastic": 0.25,
    "flip_labels": 0.1,
    "sobel_edge": 0.1,
    "brightness_contrast": 0.5,
    "blur": 0.2,
    "sharpness": 0.2,
    "noise": 0.25,
    "flip_intensity": 0.2,
}
_GEOMETRIC = ("affine", "elastic")
_LABEL_OPS = ("flip_labels", "sobel_edge")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images with std `sigma` pixels (reflect padding)."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def boundary(masks: torch.Tensor) -> torch.Tensor:
    """Morphological-gradient boundary (dilation - erosion, 3x3, outside = background) of (N, H, W)
    binary masks. Non-empty for every non-empty mask (a full mask gives the image border)."""
    padded = F.pad(masks[:, None], (1, 1, 1, 1), value=0.0)
    dilated = F.max_pool2d(padded, 3, stride=1)
    eroded = -F.max_pool2d(-padded, 3, stride=1)
    return (dilated - eroded)[:, 0]


def _affine_theta(angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) output->input sampling matrices for rotation `angle` (N,) radians, zoom `scale`
    (N,) and translation `shift` (N, 2) in normalised coordinates."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    row0 = torch.stack([cos, -sin, shift[:, 0]], dim=1)
    row1 = torch.stack([sin, cos, shift[:, 1]], dim=1)
    return torch.stack([row0, row1], dim=1)


def _resample(
    images: torch.Tensor, masks: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (N, C, H, W) images and (N, H, W) masks at grid (N, H, W, 2); masks re-binarised."""
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = F.grid_sample(
        masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return images, (warped[:, 0] > 0.5).float()


def _torch_generator(seed: float) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class TaskAugmentation:
    """One random task transform applied identically to every image and mask of an episode.

    `probabilities` overrides entries of TASK_AUGMENTATION_PROBS (unknown names raise ValueError).
    `sample(rng)` draws the ops and their parameters; `apply(images, masks, ops)` is deterministic.
    """

    def __init__(self, probabilities: Mapping[str, float] | None = None) -> None:
        unknown = set(probabilities or {}) - set(TASK_AUGMENTATION_PROBS)
        if unknown:
            raise ValueError(f"unknown task augmentations {sorted(unknown)}")
        self.probabilities = {**TASK_AUGMENTATION_PROBS, **(probabilities or {})}

    def sample(self, rng: np.random.Generator) -> list[TaskOp]:
        """The chosen ops, in application order, with their parameters."""
        chosen = [name for name, p in self.probabilities.items() if rng.random() < p]
        labels = [name for name in chosen if name in _LABEL_OPS]
        if len(labels) > 1:
            drop = labels[int(rng.integers(len(labels)))]
            chosen.remove(drop)
        params = {
            "hflip": lambda: {},
            "vflip": lambda: {},
            "affine": lambda: {
                "angle": math.radians(rng.uniform(-20, 20)),
                "scale": math.exp(rng.uniform(math.log(0.85), math.log(1.15))),
                "shift_x": rng.uniform(-0.2, 0.2),
                "shift_y": rng.uniform(-0.2, 0.2),
            },
            "elastic": lambda: {
                "alpha": rng.uniform(0.02, 0.06),
                "cells": float(rng.integers(3, 8)),
                "seed": float(rng.integers(2**31)),
            },
            "flip_labels": lambda: {},
            "sobel_edge": lambda: {},
            "brightness_contrast": lambda: {
                "brightness": rng.uniform(-0.2, 0.2),
                "contrast": rng.uniform(0.6, 1.4),
            },
            "blur": lambda: {"sigma": rng.uniform(0.3, 1.2) / 128},
            "sharpness": lambda: {
                "amount": rng.uniform(0.5, 2.0),
                "sigma": rng.uniform(0.5, 1.5) / 128,
            },
            "noise": lambda: {"std": rng.uniform(0.01, 0.08), "seed": float(rng.integers(2**31))},
            "flip_intensity": lambda: {},
        }
        return [(name, params[name]()) for name in chosen]

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, ops: list[TaskOp]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply `ops` to (N, C, R, R) images and (N, R, R) masks -> same shapes, images in [0,
        1]."""
        ops_by_name = dict(ops)
        images, masks = self._geometric(images, masks, ops_by_name)
        size = images.shape[-1]
        for name, p in ops:
            if name == "hflip":
                images, masks = images.flip(-1), masks.flip(-1)
            elif name == "vflip":
                images, masks = images.flip(-2), masks.flip(-2)
            elif name == "flip_labels":
                masks = 1.0 - masks
            elif name == "sobel_edge":
                masks = boundary(masks)
            elif name == "brightness_contrast":
                images = (images - 0.5) * p["contrast"] + 0.5 + p["brightness"]
            elif name == "blur":
                images = gaussian_blur(images, p["sigma"] * size)
            elif name == "sharpness":
                images = images + p["amount"] * (images - gaussian_blur(images, p["sigma"] * size))
            elif name == "noise":
                field = torch.randn((1, *images.shape[1:]), generator=_torch_generator(p["seed"]))
                images = images + p["std"] * field
            elif name == "flip_intensity":
                images = 1.0 - images.clamp(0.0, 1.0)
        return images.clamp(0.0, 1.0), masks

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one task transform and apply it to the whole episode."""
        return self.apply(images, masks, self.sample(rng))

    @staticmethod
    def _geometric(
        images: torch.Tensor, masks: torch.Tensor, ops: dict[str, dict[str, float]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine and elastic ops composed into one sampling grid shared by the episode."""
        if not any(name in ops for name in _GEOMETRIC):
            return images, masks
        n, _, height, width = images.shape
        affine = ops.get("affine", {"angle": 0.0, "scale": 1.0, "shift_x": 0.0, "shift_y": 0.0})
        theta = _affine_theta(
            torch.tensor([affine["angle"]]),
            torch.tensor([affine["scale"]]),
            torch.tensor([[affine["shift_x"], affine["shift_y"]]]),
        )
        grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
        if "elastic" in ops:
            p = ops["elastic"]
            cells = int(p["cells"])
            coarse = torch.randn((1, 2, cells, cells), generator=_torch_generator(p["seed"]))
            field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
            grid = grid + p["alpha"] / 2 * field.permute(0, 2, 3, 1)
        return _resample(images, masks, grid.expand(n, -1, -1, -1))


def augment_examples(
    images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-image augmentation of (N, C, R, R) images and (N, R, R) masks.

    Each image gets, each with probability `p`: a small affine (scale 0.9-1.1, rotation +-15 deg,
    shift +-5% of the image), brightness (+-0.1) / contrast (0.8-1.2), gamma (0.7-1.4); and Gaussian
    noise (std up to 0.03) with probability p / 2. Returns new tensors, images clamped to [0, 1].
    """
    n = images.shape[0]
    images, masks = images.clone(), masks.clone()

    def chosen(prob: float) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(rng.random(n) < prob))

    def uniform(low: float, high: float, index: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, (len(index), *shape))).float()

    moved = chosen(p)
    if len(moved):
        angle, scale = uniform(-math.pi / 12, math.pi / 12, moved), uniform(0.9, 1.1, moved)
        theta = _affine_theta(angle, scale, uniform(-0.1, 0.1, moved, 2))
        grid = F.affine_grid(theta, [len(moved), 1, *images.shape[-2:]], align_corners=False)
        images[moved], masks[moved] = _resample(images[moved], masks[moved], grid)
    tone = chosen(p)
    if len(tone):
        brightness, contrast = uniform(-0.1, 0.1, tone, 1, 1, 1), uniform(0.8, 1.2, tone, 1, 1, 1)
        images[tone] = ((images[tone] - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0)
    curve = chosen(p)
    if len(curve):
        images[curve] = (
            images[curve].clamp(0.0, 1.0)
            ** uniform(math.log(0.7), math.log(1.4), curve, 1, 1, 1).exp()
        )
    noisy = chosen(p / 2)
    if len(noisy):
        generator = _torch_generator(rng.integers(2**31))
        noise = torch.randn((len(noisy), *images.shape[1:]), generator=generator)
        images[noisy] = images[noisy] + uniform(0.0, 0.03, noisy, 1, 1, 1) * noise
    return images.clamp(0.0, 1.0), masks


def augment_example(
    image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """augment_examples for one (C, R, R) image and its (R, R) mask."""
    images, masks = augment_examples(image[None], mask[None], rng, p)
    return images[0], masks[0]
