"""Timing of whole-volume segmentation with and without the prompt cache."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from promptseg.data.prompts import PROMPT_TYPES
from promptseg.engine.segmenter import Segmenter


@dataclass
class VolumeTiming:
    """Seconds to segment one (S, H, W) volume at K prompts on one backend, best of `repeats` runs."""

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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_volume(segmenter: Segmenter, slices: int, size: int, shots: int, repeats: int = 3, seed: int = 0) -> VolumeTiming:
    """Segment a random (slices, size, size) volume at K = shots prompts, two ways:

    cached: prompts encoded once, every batch of max_batch slices decoded against the encoding;
    re-encoded: the prompts encoded again for every batch, as an engine without a prompt cache would do.
    """
    rng = np.random.default_rng(seed)
    backend, device, res, channels = segmenter.backend, segmenter.device, segmenter.resolution, segmenter.channels
    volume = torch.from_numpy(rng.random((slices, channels, res, res), dtype=np.float32))
    images = torch.from_numpy(rng.random((1, shots, channels, res, res), dtype=np.float32))
    maps = torch.from_numpy((rng.random((1, shots, res, res)) > 0.5).astype(np.float32))
    types = torch.full((1, shots), PROMPT_TYPES["mask"], dtype=torch.long)
    batch = segmenter.max_batch

    def cached() -> None:
        state = backend.encode(images, maps, types)
        for start in range(0, slices, batch):
            backend.decode(volume[start : start + batch], state)

    def reencoded() -> None:
        for start in range(0, slices, batch):
            backend.decode(volume[start : start + batch], backend.encode(images, maps, types))

    def best(run) -> float:
        times = []
        with torch.inference_mode():
            run()  # warm-up
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                run()
                _synchronize(device)
                times.append(time.perf_counter() - start)
        return min(times)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return VolumeTiming(name, backend.name, slices, size, shots, batch, best(cached), best(reencoded))
