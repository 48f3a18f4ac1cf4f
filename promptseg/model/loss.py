"""Segmentation loss of the model: binary cross-entropy plus soft Dice (training and test-time
adaptation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice of probs, targets (B, H, W) in [0, 1]. Returns (B,)."""
    dims = tuple(range(1, probs.dim()))
    intersection = (probs * targets).sum(dims)
    total = probs.sum(dims) + targets.sum(dims)
    return (2 * intersection + eps) / (total + eps)


def segmentation_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dice_weight: float = 1.0,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image BCE (mean over pixels, each weighted by `pixel_weights` (B, H, W) when given) +
    dice_weight * (1 - soft Dice) of logits, targets (B, H, W). Returns (B,) float32."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if pixel_weights is not None:
        bce = bce * pixel_weights.to(bce.dtype)
    bce = bce.flatten(1).mean(1)
    dice = soft_dice(torch.sigmoid(logits), targets)
    return bce + dice_weight * (1.0 - dice)


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """Mean BCE + dice_weight * (1 - soft Dice) over logits, targets (B, H, W) (the mean of
    `segmentation_losses`; images share one size, so the pixel mean of BCE is the image mean)."""
    return segmentation_losses(logits, targets, dice_weight).mean()
