"""An `promptseg export --format aoti` folder loaded for Python: both AOTInductor packages and their
metadata (the layout is promptseg.export.aoti_export's; examples/cpp loads the same packages in
C++)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptseg.errors import InputError

ENCODER_FILE = "prompt_encoder.pt2"


DECODER_FILE = "query_decoder.pt2"


METADATA_FILE = "promptseg_aoti.json"


FORMAT_VERSION = 1


@dataclass
class AOTIRunner:
    """Both packages of one export, loaded for Python (parity tests, scripting).

    encode: images (1, K, C, R, R), maps (1, K, R, R), types (1, K) -> encoding tuple;
    decode: queries (B, C, R, R), *encoding -> logits (B, R, R). Inputs are moved to the
    package's device and dtype; shapes are checked because the packages do not check them.
    """

    metadata: dict[str, Any]
    encoder: Any
    decoder: Any

    @property
    def device(self) -> torch.device:
        return torch.device(self.metadata["device"])

    def encode(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        r, c = self.metadata["resolution"], self.metadata["in_channels"]
        k = images.shape[1] if images.dim() == 5 else -1
        low, high = self.metadata["dynamic"]["prompts"]
        if tuple(images.shape) != (1, k, c, r, r) or not low <= k <= high:
            expected = f"(1, K, {c}, {r}, {r}) with K in {low}..{high}"
            raise ValueError(f"prompt images must be {expected}, got {tuple(images.shape)}")
        if tuple(maps.shape) != (1, k, r, r) or tuple(types.shape) != (1, k):
            raise ValueError(
                f"prompt maps {tuple(maps.shape)} / types {tuple(types.shape)} do not match K = {k}"
            )
        outputs = self.encoder(
            images.to(self.device, torch.float32),
            maps.to(self.device, torch.float32),
            types.to(self.device, torch.long),
        )
        return tuple(outputs)

    def decode(self, queries: torch.Tensor, *encoding: torch.Tensor) -> torch.Tensor:
        r, c = self.metadata["resolution"], self.metadata["in_channels"]
        if queries.dim() != 4 or tuple(queries.shape[1:]) != (c, r, r) or queries.shape[0] < 1:
            raise ValueError(f"queries must be (B, {c}, {r}, {r}), got {tuple(queries.shape)}")
        if len(encoding) != len(self.metadata["encoding_names"]):
            raise ValueError(
                f"expected {len(self.metadata['encoding_names'])} encoding tensors, got "
                f"{len(encoding)}"
            )
        return self.decoder(queries.to(self.device, torch.float32), *encoding)


def load_aoti(out_dir: str | os.PathLike) -> AOTIRunner:
    """Load an `export_aoti` folder; InputError names the missing or unreadable file."""
    out_dir = Path(out_dir)
    metadata = read_metadata(out_dir / METADATA_FILE)
    return AOTIRunner(
        metadata,
        load_package(out_dir / metadata["prompt_encoder"]["file"]),
        load_package(out_dir / metadata["query_decoder"]["file"]),
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """promptseg_aoti.json as a dict; InputError when missing, unparsable or of another format."""
    if not path.is_file():
        raise InputError(
            path, "not found; create it with `promptseg export --format aoti --out DIR`"
        )
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable metadata ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "promptseg-aoti":
        raise InputError(path, "not a promptseg AOTInductor metadata file")
    if metadata.get("version") != FORMAT_VERSION:
        raise InputError(
            path,
            f"metadata version {metadata.get('version')} is not supported (expected "
            f"{FORMAT_VERSION})",
        )
    return metadata


def load_package(path: Path) -> Any:
    """One .pt2 package as a callable; InputError when missing or not loadable."""
    if not path.is_file():
        raise InputError(path, "not found; re-run `promptseg export --format aoti`")
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as exc:  # the loader raises RuntimeError, or worse, on damaged archives
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not a loadable AOTInductor package ({reason})") from None
