"""Inference backends chosen by name behind one interface (see base.py).

torch        eager PyTorch, SDPA attention (any device)
triton       eager PyTorch, fused Triton attention kernels (CUDA)
compile      torch.compile of the query decoder (Inductor; CUDA graphs on GPU)
onnxruntime  the exported ONNX graphs in ONNX Runtime (CPU; CUDA provider where installed)
tensorrt     TensorRT 10 or 11 engines built from the ONNX graphs (CUDA + the tensorrt package)
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from promptseg.engine.backends.base import (
    BackendUnavailable,
    FlatPromptState,
    InferenceBackend,
    PromptState,
)
from promptseg.model import PromptSegNet

_BACKEND_CLASSES = {
    "torch": ("promptseg.engine.backends.torch_backends", "TorchBackend"),
    "triton": ("promptseg.engine.backends.torch_backends", "TritonBackend"),
    "reference": ("promptseg.engine.backends.torch_backends", "ReferenceBackend"),
    "compile": ("promptseg.engine.backends.compile_backend", "CompiledBackend"),
    "onnxruntime": ("promptseg.engine.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("promptseg.engine.backends.tensorrt_backend", "TensorRTBackend"),
}
ENGINE_BACKENDS = ("torch", "triton", "compile", "onnxruntime", "tensorrt")


def backend_class(name: str) -> type[InferenceBackend]:
    """The class behind a backend name; BackendUnavailable when its module cannot be imported."""
    if name not in _BACKEND_CLASSES:
        raise BackendUnavailable(
            f"unknown backend {name!r}; choose one of {', '.join(ENGINE_BACKENDS)}"
        )
    module_name, class_name = _BACKEND_CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"{name} backend unavailable: {exc}") from None
    return getattr(module, class_name)


def backend_availability(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when backend `name` can run on `device`, else (False, one-line reason)."""
    try:
        return backend_class(name).availability(torch.device(device))
    except BackendUnavailable as exc:
        return False, str(exc)


def create_backend(
    name: str, model: PromptSegNet, device: torch.device | str, **options: Any
) -> InferenceBackend:
    """Instantiate backend `name` for `model` on `device`; BackendUnavailable (one line) when it
    cannot run."""
    device = torch.device(device)
    cls = backend_class(name)
    ok, why = cls.availability(device)
    if not ok:
        raise BackendUnavailable(why)
    return cls(model, device, **options)


__all__ = [
    "ENGINE_BACKENDS",
    "BackendUnavailable",
    "FlatPromptState",
    "InferenceBackend",
    "PromptState",
    "backend_availability",
    "backend_class",
    "create_backend",
]
