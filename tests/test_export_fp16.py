"""fp16 graphs of the shipped weights stay close to float32 (issue 16 item 7).

Label propagation multiplies cosines by a temperature of about 150, where fp16 steps are 0.125, so
an fp16 engine could drift from the float32 model. ONNX Runtime running the fp16 export on the CPU
is the proxy for a TensorRT fp16 engine here: its probabilities must stay within
MAX_PROBABILITY_ERROR of eager float32 and its masks agree to MIN_MASK_DICE, on a synthetic phantom
prompted from four of its own slices (a fresh phantom each run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from promptseg.data.synthetic import phantom_volume
from promptseg.engine.backends import create_backend
from promptseg.model.weights import load_model, packaged_weights_path

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from promptseg.export.onnx_export import export_onnx

MAX_PROBABILITY_ERROR = 0.05
MIN_MASK_DICE = 0.99


def phantom_episode(seed: int) -> tuple[torch.Tensor, ...]:
    """Prompts (1, 4, 3, R, R) images, (1, 4, R, R) organ masks, (1, 4) mask types and (4, 3, R, R)
    queries from the slices between them, of a fresh phantom at R = 128."""
    volume, label = phantom_volume(np.random.default_rng(seed))
    organ_slices = np.flatnonzero((label == 1).reshape(len(label), -1).any(axis=1))
    chosen = organ_slices[np.linspace(0, len(organ_slices) - 1, 8).round().astype(int)]
    slices = torch.from_numpy(volume[chosen]).unsqueeze(1).expand(-1, 3, -1, -1)
    masks = torch.from_numpy((label[chosen] == 1).astype(np.float32))
    prompts, queries = slices[0::2], slices[1::2]
    return prompts[None], masks[0::2][None], torch.ones(1, 4, dtype=torch.long), queries


def test_fp16_export_of_the_shipped_weights_matches_float32(tmp_path: Path) -> None:
    model = load_model(packaged_weights_path()).float().eval()
    images, maps, types, queries = phantom_episode(
        seed=int(np.random.default_rng().integers(2**31))
    )
    eager = create_backend("torch", model, "cpu")
    expected = torch.sigmoid(eager.decode(queries, eager.encode(images, maps, types)))
    export_onnx(model, tmp_path / "fp16", dtype=torch.float16)
    half = create_backend("onnxruntime", model, "cpu", model_dir=tmp_path / "fp16")
    actual = torch.sigmoid(half.decode(queries, half.encode(images, maps, types)))
    error = float((actual - expected).abs().max())
    a, b = actual > 0.5, expected > 0.5
    dice = float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))
    assert error <= MAX_PROBABILITY_ERROR, f"fp16 probabilities drift by {error:.4f}"
    assert dice >= MIN_MASK_DICE, f"fp16 masks agree with float32 at Dice {dice:.4f}"
