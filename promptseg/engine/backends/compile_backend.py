"""`compile` backend: the query decoder through torch.compile (Inductor; CUDA graphs on GPU)."""
from __future__ import annotations

import shutil

import torch

from promptseg.engine.backends.torch_backends import TorchBackend
from promptseg.kernels import default_backend
from promptseg.model import PromptEncoding, PromptSegNet


class CompiledBackend(TorchBackend):
    """Eager prompt encoding (once per prompt set) and a compiled query decoder (every batch).

    On CUDA the decoder is compiled with mode="reduce-overhead", which replays CUDA graphs, and its
    attention runs the Triton kernels; on the CPU Inductor generates C++ and needs a compiler.
    The first batch of each new shape pays the compilation.
    """

    name = "compile"

    def __init__(self, model: PromptSegNet, device: torch.device) -> None:
        self.attention = default_backend(device)
        super().__init__(model, device)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.compiled_decoder = torch.compile(self.model.query_decoder, mode=mode, dynamic=False)

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        if device.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return False, "compile backend on the CPU needs a C++ compiler (c++ or g++) on PATH for Inductor"
        return True, ""

    def decode(self, queries: torch.Tensor, state: PromptEncoding) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.compiled_decoder(queries.to(self.device), state)
            return logits.float().cpu()
