"""Hardness-weighted task sampling: tasks with a high running loss are drawn more often.

The trainer feeds every episode's loss to `TaskHardness.update`; at each refresh (every
checkpoint, so that a resumed run draws the same episodes) the sampler's task probabilities become

    p_t = (1 - mix) * base_t + mix * base_t * loss_t / sum_u(base_u * loss_u)

where base_t is the dataset-then-label balanced probability (episodes.base_task_weights) and
loss_t the running mean loss of task t (tasks not seen yet count as the mean of those seen).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TaskHardness:
    """Exponential running mean (`decay` per episode of the task) of each task's episode loss."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.losses: dict[str, float] = {}

    def update(self, tasks: Sequence[str], losses: Sequence[float]) -> None:
        """Fold the loss of one episode of each named task into its running mean."""
        for task, loss in zip(tasks, losses):
            if not np.isfinite(loss):
                continue
            previous = self.losses.get(task)
            self.losses[task] = (
                float(loss)
                if previous is None
                else self.decay * previous + (1 - self.decay) * float(loss)
            )

    def weights(self, names: Sequence[str], base: np.ndarray, mix: float) -> np.ndarray:
        """Task probabilities (len(names),) mixing `base` with its hardness-weighted version."""
        if not self.losses or mix <= 0 or len(names) == 0:
            return np.asarray(base, dtype=np.float64)
        seen = np.mean(list(self.losses.values()))
        loss = np.array([self.losses.get(name, seen) for name in names], dtype=np.float64)
        hard = base * np.maximum(loss, 1e-6)
        return (1.0 - mix) * base + mix * hard / hard.sum()

    def state(self) -> dict[str, float]:
        return dict(self.losses)

    def load_state(self, losses: dict[str, float]) -> None:
        self.losses = {str(k): float(v) for k, v in losses.items()}
