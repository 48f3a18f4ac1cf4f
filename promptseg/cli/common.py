"""Options and model loading shared by the inference subcommands (segment, demo)."""
from __future__ import annotations

import argparse

import torch

from promptseg.engine.segmenter import Segmenter, packaged_weights_path
from promptseg.errors import CheckpointError, InputError
from promptseg.kernels import BACKENDS, triton_available


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --device."""
    parser.add_argument("--checkpoint", metavar="FILE", help="weights file (default: the weights shipped with promptseg)")
    parser.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """The torch device for --device (None: cuda when present); InputError for unknown or absent devices."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError("--device", f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device", f"{name} requested but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError("--device", f"{name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise InputError("--device", f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def load_segmenter(
    checkpoint: str | None, device: str | None, max_batch: int = 16, attention_backend: str | None = None
) -> Segmenter:
    """A Segmenter from `checkpoint`, or from the packaged weights when None (with a clear error if absent)."""
    if attention_backend is not None and attention_backend not in BACKENDS:
        raise InputError("--attention-backend", f"unknown backend {attention_backend!r}; choose one of {', '.join(BACKENDS)}")
    if attention_backend == "triton":
        available, reason = triton_available()
        if not available:
            raise InputError("--attention-backend", reason)
    resolved = resolve_device(device)
    options = {"device": resolved, "max_batch": max_batch, "attention_backend": attention_backend}
    if checkpoint is not None:
        return Segmenter.from_checkpoint(checkpoint, **options)
    if not packaged_weights_path().is_file():
        raise CheckpointError(
            f"packaged weights not found at {packaged_weights_path()}; reinstall promptseg or pass --checkpoint FILE"
        )
    return Segmenter.from_pretrained(**options)
