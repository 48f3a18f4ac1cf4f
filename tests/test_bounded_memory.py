"""Bounded memory (issue 6): segmenting a volume needs, beyond its input and output arrays, memory
for one batch of slices whatever the depth (no whole-volume intermediates: no copies of the output,
no masks of the input).

tracemalloc sees NumPy's allocations (torch's CPU tensors are per batch and not traced), so the
extra peak measured here is what the engine allocates in NumPy besides the unavoidable output array.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint  # noqa: F401 (fixture)

from promptseg.engine.segmenter import Segmenter
from promptseg.torch_threads import single_torch_thread

IN_PLANE = (32, 32)
SLACK_BYTES = 256 * 2**10


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint: Path) -> Iterator[Segmenter]:  # noqa: F811
    """The tiny model on one thread: memory does not depend on it, and 2 busy cores run it faster
    so."""
    with single_torch_thread():
        yield Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=16)


def ct_volume(depth: int, axis: int) -> np.ndarray:
    """An int16 CT-like volume with `depth` slices of IN_PLANE along `axis`."""
    shape = list(IN_PLANE)
    shape.insert(axis, depth)
    return np.random.default_rng(depth).integers(-1000, 1000, shape).astype(np.int16)


def extra_peak(run: Callable[[], np.ndarray]) -> int:
    """Peak NumPy memory of `run()` beyond the array it returns (its inputs exist before
    measuring)."""
    tracemalloc.start()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - result.nbytes


def extra_peaks(
    depths: tuple[int, ...], axis: int, segment: Callable[[np.ndarray], np.ndarray]
) -> dict[int, int]:
    """`extra_peak` of segment(volume) for a CT volume of each depth along `axis` (built before
    measuring)."""
    return {
        depth: extra_peak(lambda volume=ct_volume(depth, axis): segment(volume)) for depth in depths
    }


def test_segment_volume_extra_memory_does_not_grow_with_depth(segmenter: Segmenter) -> None:
    """1024 slices along axis 2 need no more extra memory than 128 (x 1.5 + 256 KiB); the output is
    4 MiB at 1024."""
    image, mask = disk_example(np.random.default_rng(0), IN_PLANE)
    prompts = segmenter.encode_prompts([image], [mask])
    extras = extra_peaks(
        (128, 1024),
        2,
        lambda volume: segmenter.segment_volume(volume, prompts, axis=2).probabilities,
    )
    assert extras[1024] <= 1.5 * extras[128] + SLACK_BYTES, extras


def test_several_labels_share_the_bound(segmenter: Segmenter) -> None:
    """Two labels in one streamed pass along axis 1: the (L, X, Y, Z) output is filled in place,
    never stacked or copied."""
    rng = np.random.default_rng(1)
    image, disk = disk_example(rng, IN_PLANE)
    label_map = disk.copy()
    label_map[2:8, 2:8] = 2
    prompts = segmenter.encode_labels([image], [label_map])
    extras = extra_peaks(
        (64, 512),
        1,
        lambda volume: segmenter.segment_volume_labels(volume, prompts, axis=1).probabilities,
    )
    assert extras[512] <= 1.5 * extras[64] + SLACK_BYTES, extras
