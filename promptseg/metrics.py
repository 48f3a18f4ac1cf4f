"""Scores of predicted masks against the truth: Dice, calibration error and predictive entropy.

The ground floor of the package (it imports nothing of promptseg): training (validation Dice), the
engine (ensemble bias selection, batch job scores), evaluation and the demo all score with these.
"""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 10


def hard_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks pred, target (B, H, W) bool; 1 when both are empty. Returns (B,)
    float."""
    dims = tuple(range(1, pred.dim()))
    pred, target = pred.bool(), target.bool()
    intersection = (pred & target).sum(dims).float()
    total = pred.sum(dims).float() + target.sum(dims).float()
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def dice_percent(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice (0-100) of two boolean arrays of one shape taken as one region; 100 when both are
    empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 100.0 if total == 0 else 200.0 * int(np.logical_and(prediction, truth).sum()) / total


def query_dice(probs: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard Dice (0-100) of each query: probs (Q, R, R) > threshold against masks (Q, R, R) ->
    (Q,)."""
    if probs.shape != masks.shape:
        raise ValueError(
            f"prediction shape {tuple(probs.shape)} does not match the masks {tuple(masks.shape)}"
        )
    return 100.0 * hard_dice(probs > threshold, masks > 0.5)


def episode_dice(probs: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean over queries of the hard Dice (0-100) of probs (Q, R, R) > 0.5 against masks (Q, R,
    R)."""
    return float(query_dice(probs, masks).mean())


def expected_calibration_error(
    probs: torch.Tensor, masks: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Expected calibration error (0-100) of foreground probabilities probs against binary masks
    (same shape): pixels fall into `bins` equal-width bins of p ([0, 1/bins), ..., [1 - 1/bins, 1]);
    ECE = 100 * sum over bins of (pixels in bin / pixels) * |foreground fraction - mean p| in the
    bin."""
    p = probs.detach().flatten().double().clamp(0.0, 1.0)
    y = (masks.flatten() > 0.5).double()
    index = (p * bins).long().clamp(max=bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    gap = (
        torch.bincount(index, weights=y, minlength=bins)
        - torch.bincount(index, weights=p, minlength=bins)
    ).abs()
    return 100.0 * float(gap.sum() / count.sum())


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean binary predictive entropy in bits of each query's probabilities (Q, R, R) -> (Q,)."""
    p = probs.double().clamp(1e-7, 1.0 - 1e-7)
    return (-(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))).flatten(1).mean(1)
