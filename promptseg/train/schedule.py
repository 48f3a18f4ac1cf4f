"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr_ratio · lr."""

from __future__ import annotations

import math


def learning_rate(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """The learning rate at `step` (0-based); a pure function, so resumed runs follow the same
    curve."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
