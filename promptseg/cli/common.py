"""Options and model loading shared by the inference subcommands (segment, demo)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from promptseg.engine.adaptation import MAX_ADAPT_STEPS, Adaptation
from promptseg.engine.backends import (
    ENGINE_BACKENDS,
    BackendUnavailable,
    backend_availability,
    backend_class,
)
from promptseg.engine.segmenter import Segmenter, checked_device
from promptseg.errors import CheckpointError, InputError
from promptseg.model.weights import packaged_weights_path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --device."""
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights file (default: the weights shipped with promptseg)",
    )
    parser.add_argument(
        "--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)"
    )


def add_threshold_argument(parser: argparse.ArgumentParser) -> None:
    """--threshold P, the probability above which a pixel is foreground (checked by
    check_threshold)."""
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        metavar="P",
        help="probability above which a pixel is foreground",
    )


def check_threshold(threshold: float) -> None:
    """InputError naming --threshold unless 0 < threshold < 1 (NaN included)."""
    if not 0.0 < threshold < 1.0:
        raise InputError("--threshold", f"must lie strictly between 0 and 1, got {threshold}")


def resolve_device(name: str | None) -> torch.device:
    """The torch device for --device (None: cuda when present); InputError for unknown or absent
    devices."""
    return checked_device(name, "--device")


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend NAME, one of the engine backends."""
    parser.add_argument(
        "--backend",
        choices=ENGINE_BACKENDS,
        metavar="NAME",
        help=f"inference backend: {', '.join(ENGINE_BACKENDS)} (default: triton on CUDA, else "
        "torch)",
    )
    parser.add_argument(
        "--export-dir",
        metavar="DIR",
        help="files written by `promptseg export` for --backend onnxruntime (--format onnx) or "
        "tensorrt "
        "(--format tensorrt); without it they are exported on the fly",
    )


def backend_options(backend: str | None, export_dir: str | None) -> dict[str, Any] | None:
    """Constructor options of `backend` for --export-dir; InputError when the backend takes no
    exported files."""
    if export_dir is None:
        return None
    option = export_dir_option(backend)
    if option is None:
        raise InputError(
            "--export-dir", "only --backend onnxruntime or tensorrt use exported files"
        )
    return {option: export_dir}


def export_dir_option(backend: str | None) -> str | None:
    """The constructor keyword through which `backend` takes exported files, or None (also for no
    backend)."""
    if backend is None:
        return None
    try:
        return backend_class(backend).export_dir_option
    except BackendUnavailable as exc:
        raise InputError("--backend", str(exc)) from None


def load_segmenter(
    checkpoint: str | None,
    device: str | None,
    max_batch: int = 16,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    ensemble: int = 1,
    adapt: int = 0,
    candidates: int = 0,
    ensemble_shift: bool = True,
    member_maps: bool = False,
) -> Segmenter:
    """A Segmenter from `checkpoint`, or from the packaged weights when None (with a clear error if
    absent), averaging `ensemble` members (returning the first `candidates` of them too) and
    adapting to each prompt set for `adapt` steps (0: off); `ensemble_shift` moves the mask
    threshold by the ensemble's leave-one-out shift; `member_maps` decodes every member too (for the
    variance).

    An unknown or unavailable backend is an InputError naming --backend with the reason.
    """
    resolved = resolve_device(device)
    if backend is not None:
        ok, why = backend_availability(backend, resolved)
        if not ok:
            raise InputError("--backend", why)
    if not 0 <= adapt <= MAX_ADAPT_STEPS:
        raise InputError("--adapt", f"must lie in 0..{MAX_ADAPT_STEPS}, got {adapt}")
    options = {
        "device": resolved,
        "max_batch": max_batch,
        "backend": backend,
        "backend_options": backend_options,
        "ensemble": ensemble,
        "adaptation": Adaptation(adapt) if adapt else None,
        "candidates": candidates,
        "ensemble_shift": ensemble_shift,
        "member_maps": member_maps,
    }
    if checkpoint is None and not packaged_weights_path().is_file():
        raise CheckpointError(
            f"packaged weights not found at {packaged_weights_path()}; reinstall promptseg or pass "
            "--checkpoint FILE"
        )
    try:
        if checkpoint is not None:
            return Segmenter.from_checkpoint(checkpoint, **options)
        return Segmenter.from_pretrained(**options)
    except BackendUnavailable as exc:
        raise InputError("--backend", str(exc)) from None
