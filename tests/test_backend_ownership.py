"""Inference backends run a model of their own: building one leaves the caller's model as it was."""

from __future__ import annotations

import torch

from promptseg import Segmenter
from promptseg.engine.backends import create_backend
from promptseg.model import PromptSegNet
from tests.helpers import TINY_CONFIG


def test_a_backend_leaves_the_callers_model_unchanged() -> None:
    torch.manual_seed(0)
    model = PromptSegNet(TINY_CONFIG).train().set_attention_kernel("reference")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    backend = create_backend("torch", model, torch.device("cpu"))
    assert backend.model is not model
    assert model.training and model.attention_kernel == "reference"
    assert not backend.model.training and backend.model.attention_kernel == "sdpa"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
        assert tensor.data_ptr() != backend.model.state_dict()[name].data_ptr(), name


def test_two_segmenters_on_one_model_are_independent() -> None:
    """Changing one Segmenter's model (here its attention routing) does not reach the other's."""
    torch.manual_seed(0)
    model = PromptSegNet(TINY_CONFIG)
    first, second = Segmenter(model, backend="torch"), Segmenter(model, backend="torch")
    first.backend.model.set_attention_kernel("reference")
    assert second.backend.model.attention_kernel == "sdpa"
    assert model.attention_kernel == "sdpa"
    images = torch.rand(1, 2, TINY_CONFIG.in_channels, 32, 32)
    maps = (torch.rand(1, 2, 32, 32) > 0.5).float()
    types = torch.ones(1, 2, dtype=torch.long)
    queries = torch.rand(2, TINY_CONFIG.in_channels, 32, 32)
    logits = [
        s.backend.decode(queries, s.backend.encode(images, maps, types)) for s in (first, second)
    ]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
