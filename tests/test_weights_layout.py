"""Each sub-module has one owner, so a state dict names every tensor once; legacy aliases still
load."""

from __future__ import annotations

import torch

from promptseg.model import PromptSegNet
from promptseg.model.weights import load_model, load_state, packaged_weights_path
from tests.helpers import TINY_CONFIG


def test_state_dict_names_each_tensor_once() -> None:
    model = PromptSegNet(TINY_CONFIG)
    state = model.state_dict()
    storages = {(t.untyped_storage().data_ptr(), t.storage_offset()) for t in state.values()}
    assert len(storages) == len(state)
    assert len(list(model.parameters())) == len(
        list(model.named_parameters(remove_duplicate=False))
    )


def test_packaged_weights_hold_exactly_the_model_names() -> None:
    from safetensors import safe_open

    model = load_model(packaged_weights_path())
    with safe_open(str(packaged_weights_path()), framework="pt") as handle:
        assert set(handle.keys()) == set(model.state_dict())


def test_a_legacy_state_dict_with_aliases_loads() -> None:
    """State dicts of models built before the one-owner layout also named the shared encoder and
    blocks under prompt_encoder. and query_decoder.; the key map drops those aliases."""
    torch.manual_seed(0)
    source = PromptSegNet(TINY_CONFIG).eval()
    legacy = dict(source.state_dict())
    for name, tensor in source.state_dict().items():
        if name.startswith(("encoder.", "blocks.", "propagations.")):
            legacy[f"prompt_encoder.{name}"] = tensor
            legacy[f"query_decoder.{name}"] = tensor
    torch.manual_seed(1)
    target = PromptSegNet(TINY_CONFIG).eval()
    load_state(target, legacy, "legacy.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
