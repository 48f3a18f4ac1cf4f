"""Eager PyTorch backends: `torch` (SDPA attention) and `triton` (the fused Triton kernels)."""
from __future__ import annotations

import torch

from promptseg.engine.backends.base import InferenceBackend
from promptseg.kernels import triton_available
from promptseg.model import PromptEncoding, PromptSegNet


class TorchBackend(InferenceBackend):
    """The model in eager mode with PyTorch's scaled_dot_product_attention (any device)."""

    name = "torch"
    attention = "sdpa"

    def __init__(self, model: PromptSegNet, device: torch.device) -> None:
        super().__init__(model, device)
        self.model = model.to(device).eval().set_attention_backend(self.attention)

    def encode(self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> PromptEncoding:
        with torch.inference_mode():
            return self.model.encode_prompts(images.to(self.device), maps.to(self.device), types.to(self.device))

    def decode(self, queries: torch.Tensor, state: PromptEncoding) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode(queries.to(self.device), state).float().cpu()


class TritonBackend(TorchBackend):
    """Eager model whose attention runs the fused Triton kernels (CUDA; the interpreter on CPU)."""

    name = "triton"
    attention = "triton"

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        """Whether the kernels run on `device`: CUDA devices, or the CPU under TRITON_INTERPRET=1."""
        return triton_available(device)


class ReferenceBackend(TorchBackend):
    """Eager model with the plain PyTorch reference attention (for checking the others)."""

    name = "reference"
    attention = "reference"
