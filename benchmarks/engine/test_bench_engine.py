"""pytest-benchmark suite of the engine backends at representative sizes (any device).

Run from the repository root: python -m pytest benchmarks/engine/test_bench_engine.py
The full grid and result files come from `python -m benchmarks.engine.bench_engine`.
"""

import numpy as np
import pytest
import torch
from bench_engine import model_at

from promptseg.engine.backends import ENGINE_BACKENDS, backend_availability, create_backend
from promptseg.engine.benchmark import random_prompts, synchronize
from promptseg.engine.segmenter import Segmenter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESOLUTION = 128
SHOTS = 8


def synchronized(run):
    """`run` followed by a device synchronisation, so that the timer sees finished work."""

    def call():
        result = run()
        synchronize(DEVICE)
        return result

    return call


@pytest.fixture(scope="module")
def model():
    return model_at(RESOLUTION)


@pytest.fixture(scope="module", params=ENGINE_BACKENDS)
def backend(request, model):
    ok, why = backend_availability(request.param, DEVICE)
    if not ok:
        pytest.skip(why)
    return create_backend(request.param, model, DEVICE)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_cached_prompts(benchmark, backend, batch):
    rng = np.random.default_rng(0)
    state = backend.encode(*random_prompts(backend.config, SHOTS, rng))
    queries = torch.from_numpy(
        rng.random((batch, backend.config.in_channels, RESOLUTION, RESOLUTION), dtype=np.float32)
    )
    benchmark.extra_info.update(backend=backend.name, shots=SHOTS, batch=batch, device=str(DEVICE))
    logits = benchmark(synchronized(lambda: backend.decode(queries, state)))
    assert logits.shape == (batch, RESOLUTION, RESOLUTION)


def test_encode_prompts(benchmark, backend):
    prompts = random_prompts(backend.config, SHOTS, np.random.default_rng(1))
    benchmark.extra_info.update(backend=backend.name, shots=SHOTS, device=str(DEVICE))
    benchmark(synchronized(lambda: backend.encode(*prompts)))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "re-encoded"])
def test_whole_volume(benchmark, model, cached):
    """A 64-slice volume at K = 8 on the default backend, prompts encoded once or once per batch of
    16."""
    segmenter = Segmenter(model, device=DEVICE, max_batch=16)
    rng = np.random.default_rng(2)
    prompts = random_prompts(model.config, SHOTS, rng)
    volume = torch.from_numpy(
        rng.random((64, model.config.in_channels, RESOLUTION, RESOLUTION), dtype=np.float32)
    )

    def run():
        state = segmenter.backend.encode(*prompts)
        for start in range(0, volume.shape[0], 16):
            if not cached and start:
                state = segmenter.backend.encode(*prompts)
            segmenter.backend.decode(volume[start : start + 16], state)

    benchmark.extra_info.update(
        backend=segmenter.backend_name, slices=64, shots=SHOTS, cached=cached
    )
    benchmark.pedantic(synchronized(run), rounds=3, warmup_rounds=1)
