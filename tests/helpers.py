"""Shared test helpers: a tiny random-initialised checkpoint and small generated images and
volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import save_weights

TINY_CONFIG = ModelConfig(
    resolution=32,
    widths=(8, 16, 32, 32),
    head_dim=16,
    attention_depth=1,
    blocks_per_stage=1,
    label_propagation=True,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a random-initialised TINY_CONFIG model (seed 0), saved once per test session."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(PromptSegNet(TINY_CONFIG), path)
    return path


def disk_example(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grayscale uint8 image (H, W) with one bright disk, and its 0/1 uint8 mask."""
    height, width = size
    cy, cx = rng.uniform(0.35, 0.65, 2) * (height, width)
    radius = rng.uniform(0.15, 0.25) * min(height, width)
    ys, xs = np.mgrid[:height, :width]
    mask = ((ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2).astype(np.uint8)
    image = np.clip(60 + 120 * mask + rng.normal(0, 15, size), 0, 255).astype(np.uint8)
    return image, mask


def write_png(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 array as PNG and return the path."""
    Image.fromarray(array).save(path)
    return path


def write_disk_dataset(
    root: Path, count: int, size: tuple[int, int] = (40, 48), labels: dict | None = None
) -> Path:
    """A simple-layout dataset at `root` (images/, labels/) of `count` disk_example PNGs of `size`
    (seed 0), with a dataset.json naming `labels` when given; returns root."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        image, mask = disk_example(rng, size)
        write_png(root / "images" / f"case{index}.png", image)
        write_png(root / "labels" / f"case{index}.png", mask)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"name": root.name, "labels": labels}))
    return root


def write_nifti(
    path: Path, array: np.ndarray, affine: np.ndarray | None = None, description: bytes = b""
) -> Path:
    """Save an array as NIfTI-1 with `affine` (identity by default), mm units and a description."""
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = description
    nib.save(image, path)
    return path
