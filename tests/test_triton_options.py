"""The environment switches of the Triton kernels (promptseg.kernels.triton_options): when fp32
inputs take TF32 dots, and whether a group's queries are packed. Pure policy, no kernels run."""

import pytest
import torch

from promptseg.kernels import triton_options
from promptseg.kernels.triton_options import (
    PACK_ENV,
    TF32_ENV,
    needs_grad,
    queries_per_set,
    tf32_enabled,
)


@pytest.mark.parametrize(
    ("mode", "inference", "training"),
    [(None, True, False), ("auto", True, False), ("", True, False), ("0", False, False)]
    + [("1", True, True), (" AUTO ", True, False)],
)
def test_tf32_policy_on_cuda_fp32(
    monkeypatch: pytest.MonkeyPatch, mode: str | None, inference: bool, training: bool
) -> None:
    """fp32 on CUDA: TF32 in inference by default, in training only with "1", never with "0"."""
    if mode is None:
        monkeypatch.delenv(TF32_ENV, raising=False)
    else:
        monkeypatch.setenv(TF32_ENV, mode)
    assert tf32_enabled(torch.float32, "cuda", training=False) is inference
    assert tf32_enabled(torch.float32, torch.device("cuda", 1), training=True) is training


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_tf32_never_for_half_inputs_or_off_cuda(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Half inputs use tensor cores anyway, and the CPU (the interpreter) keeps exact dots."""
    monkeypatch.setenv(TF32_ENV, mode)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert not tf32_enabled(dtype, "cuda", training=False)
    assert not tf32_enabled(torch.float32, "cpu", training=False)


def test_bad_tf32_value_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TF32_ENV, "yes")
    with pytest.raises(ValueError, match=r"PROMPTSEG_TRITON_TF32='yes' is not one of auto, 0, 1"):
        tf32_enabled(torch.float32, "cuda", training=False)


def test_needs_grad_follows_grad_mode_and_requires_grad() -> None:
    leaf, plain = torch.zeros(2, requires_grad=True), torch.zeros(2)
    assert needs_grad(plain, leaf, None) and not needs_grad(plain, None)
    with torch.no_grad():
        assert not needs_grad(leaf)
    with torch.inference_mode():
        assert not needs_grad(leaf)


@pytest.mark.parametrize(("value", "packed"), [(None, True), ("1", True), ("0", False)])
def test_packing_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, packed: bool) -> None:
    """All B / G queries of a group form one row set unless PROMPTSEG_TRITON_PACK_QUERIES=0."""
    if value is None:
        monkeypatch.delenv(PACK_ENV, raising=False)
    else:
        monkeypatch.setenv(PACK_ENV, value)
    assert triton_options.packing_enabled() is packed
    assert queries_per_set(8) == (8 if packed else 1) and queries_per_set(1) == 1
