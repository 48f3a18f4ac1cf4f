"""Timing of whole-volume segmentation with and without the prompt cache, and the timing helpers
and random prompts the benchmarks under benchmarks/engine share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from promptseg.engine.segmenter import Segmenter
from promptseg.model import ModelConfig
from promptseg.model.prompt_types import PROMPT_TYPES


@dataclass
class VolumeTiming:
    """Seconds to segment one (S, H, W) volume at K prompts on one backend, best of `repeats`
    runs."""

    device: str
    backend: str
    slices: int
    size: int
    shots: int
    batch: int
    cached_s: float
    reencoded_s: float

    @property
    def speedup(self) -> float:
        return self.reencoded_s / self.cached_s

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_seconds(
    run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> list[float]:
    """Wall seconds of each of `repeats` calls of `run`, after `warmup` untimed calls; the device is
    synchronised before every clock reading, so queued CUDA work counts."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def random_prompts(
    config: ModelConfig, shots: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K = shots random mask prompts at the model's resolution R and channels C: images (1, K, C, R,
    R) in [0, 1), binary maps (1, K, R, R) and mask types (1, K)."""
    r, c = config.resolution, config.in_channels
    images = torch.from_numpy(rng.random((1, shots, c, r, r), dtype=np.float32))
    maps = torch.from_numpy((rng.random((1, shots, r, r)) > 0.5).astype(np.float32))
    return images, maps, torch.full((1, shots), PROMPT_TYPES["mask"], dtype=torch.long)


def time_volume(
    segmenter: Segmenter, slices: int, size: int, shots: int, repeats: int = 3, seed: int = 0
) -> VolumeTiming:
    """Segment a random (slices, size, size) volume at K = shots prompts, two ways:

    cached: prompts encoded once, every batch of max_batch slices decoded against the encoding;
    re-encoded: the prompts encoded again for every batch, as an engine without a prompt cache would
    do.
    """
    rng = np.random.default_rng(seed)
    backend, device, res, channels = (
        segmenter.backend,
        segmenter.device,
        segmenter.resolution,
        segmenter.channels,
    )
    volume = torch.from_numpy(rng.random((slices, channels, res, res), dtype=np.float32))
    prompts = random_prompts(segmenter.model.config, shots, rng)
    batch = segmenter.max_batch

    def cached() -> None:
        state = backend.encode(*prompts)
        for start in range(0, slices, batch):
            backend.decode(volume[start : start + batch], state)

    def reencoded() -> None:
        for start in range(0, slices, batch):
            backend.decode(volume[start : start + batch], backend.encode(*prompts))

    with torch.inference_mode():
        cached_s = min(run_seconds(cached, device, repeats))
        reencoded_s = min(run_seconds(reencoded, device, repeats))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return VolumeTiming(name, backend.name, slices, size, shots, batch, cached_s, reencoded_s)
