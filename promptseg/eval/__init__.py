"""Evaluation: baselines, model predictor and the few-shot Dice report (docs/design.md section
8)."""

from promptseg.eval.baselines import (
    FineTunedUNetBaseline,
    ModelPredictor,
    NearestPromptBaseline,
    Predictor,
    SmallUNet,
)
from promptseg.eval.evaluate import CellScore, EvalReport, evaluate

__all__ = [
    "CellScore",
    "EvalReport",
    "FineTunedUNetBaseline",
    "ModelPredictor",
    "NearestPromptBaseline",
    "Predictor",
    "SmallUNet",
    "evaluate",
]
