"""What `promptseg eval` scores per episode: probabilities and the threshold that makes the mask.

Most predictors' masks are their probabilities above 0.5. An ensemble with a leave-one-out shift
(promptseg.engine.ensemble) reports its members' unshifted mean probability, for calibration, and
moves the threshold instead; such a predictor offers `predict_with_threshold(episode)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from promptseg.data.episodes import Episode


@dataclass(frozen=True)
class Prediction:
    """probabilities (Q, R, R) float in [0, 1] and the probability above which a pixel is
    foreground."""

    probabilities: torch.Tensor
    threshold: float = 0.5


def predict(predictor: Any, episode: Episode) -> Prediction:
    """predictor.predict_with_threshold(episode) when it has one, else predict(episode) at 0.5."""
    with_threshold = getattr(predictor, "predict_with_threshold", None)
    if with_threshold is not None:
        return with_threshold(episode)
    return Prediction(predictor.predict(episode))
