"""Concurrency and determinism (issue 6): one Segmenter shared by threads gives exactly the results
of serial use; the same inputs give bit-identical outputs across instances and repeated calls; the
prompt cache stays consistent and bounded under concurrent encode_prompts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint  # noqa: F401 (fixture)

from promptseg.engine.segmenter import EncodedPrompts, Segmenter
from promptseg.torch_threads import single_torch_thread

THREADS = 4


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """One torch thread per Python thread: on 2 busy cores, intra-op threads on top of 4 Python
    threads make each call orders of magnitude slower, and the results do not depend on it."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def examples() -> dict[str, list[np.ndarray]]:
    """Prompt images and masks (three sets of two) and queries of several sizes, plus a small
    volume."""
    rng = np.random.default_rng(0)
    pairs = [disk_example(rng, (40, 48)) for _ in range(6)]
    return {
        "images": [image for image, _ in pairs],
        "masks": [mask for _, mask in pairs],
        "queries": [
            disk_example(rng, size)[0] for size in ((36, 44), (40, 48), (25, 60), (64, 64))
        ],
        "volume": [
            np.stack([disk_example(rng, (30, 30))[0] for _ in range(20)], axis=-1).astype(np.int16)
        ],
    }


def make_jobs(examples: dict[str, list[np.ndarray]]) -> list[tuple[int, str, int]]:
    """(prompt set, kind, query) triples: different queries and prompt sets, each job present three
    times."""
    distinct = [
        (0, "segment", 0),
        (1, "segment", 1),
        (2, "segment", 2),
        (0, "segment", 3),
        (1, "volume", 0),
        (2, "volume", 0),
    ]
    return distinct * 3


def run_job(
    segmenter: Segmenter, examples: dict[str, list[np.ndarray]], job: tuple[int, str, int]
) -> np.ndarray:
    """Encode prompt set `job[0]` (pairs 2k, 2k+1) and segment one query or the volume with it."""
    prompt_set, kind, query = job
    chosen = slice(2 * prompt_set, 2 * prompt_set + 2)
    prompts = segmenter.encode_prompts(examples["images"][chosen], examples["masks"][chosen])
    if kind == "volume":
        return segmenter.segment_volume(examples["volume"][query], prompts, axis=2).probabilities
    return segmenter.segment([examples["queries"][query]], prompts)


def new_segmenter(checkpoint: Path, cache_bytes: int = 512 * 2**20) -> Segmenter:
    return Segmenter.from_checkpoint(checkpoint, device="cpu", max_batch=8, cache_bytes=cache_bytes)


def test_threads_sharing_one_segmenter_match_serial_use(tiny_checkpoint: Path, examples) -> None:  # noqa: F811
    """4 threads on one Segmenter, encoding and segmenting different and identical jobs:
    bit-identical to serial."""
    jobs = make_jobs(examples)
    alone = new_segmenter(tiny_checkpoint)
    serial = [run_job(alone, examples, job) for job in jobs]
    shared = new_segmenter(tiny_checkpoint)
    with ThreadPoolExecutor(THREADS) as pool:
        threaded = list(pool.map(lambda job: run_job(shared, examples, job), jobs))
    for job, expected, got in zip(jobs, serial, threaded):
        assert got.dtype == expected.dtype and np.array_equal(got, expected), (
            f"job {job} differs under threads"
        )


def test_same_inputs_are_bit_identical_across_instances_and_calls(
    tiny_checkpoint: Path, examples
) -> None:  # noqa: F811
    first, second = new_segmenter(tiny_checkpoint), new_segmenter(tiny_checkpoint)
    for job in [(0, "segment", 0), (1, "volume", 0)]:
        results = [
            run_job(first, examples, job),
            run_job(second, examples, job),
            run_job(first, examples, job),
        ]
        first.cache.clear()
        results.append(run_job(first, examples, job))  # re-encoded after clearing the cache
        assert all(np.array_equal(r, results[0]) for r in results[1:]), (
            f"job {job} is not deterministic"
        )


def test_prompt_cache_is_consistent_under_concurrent_encoding(
    tiny_checkpoint: Path, examples
) -> None:  # noqa: F811
    """16 concurrent encodings of one prompt set: one entry, every call counted once as a hit or a
    miss, and every returned encoding gives the same result."""
    segmenter = new_segmenter(tiny_checkpoint)
    start = threading.Barrier(THREADS)

    def encode(call: int) -> EncodedPrompts:
        if call < THREADS:
            start.wait()  # the first four calls race for the empty cache
        return segmenter.encode_prompts(examples["images"][:2], examples["masks"][:2])

    with ThreadPoolExecutor(THREADS) as pool:
        encodings = list(pool.map(encode, range(16)))
    cache = segmenter.cache
    assert cache.hits + cache.misses == 16
    assert cache.misses == 1  # threads racing for the same missing set wait for one encoding
    assert len(cache) == 1 and len({e.key for e in encodings}) == 1
    query = examples["queries"][0]
    expected = segmenter.segment([query], encodings[0])
    assert all(np.array_equal(segmenter.segment([query], e), expected) for e in encodings[1:])


def test_prompt_cache_stays_within_its_byte_bound_under_concurrency(
    tiny_checkpoint: Path, examples
) -> None:  # noqa: F811
    """Threads encoding many different prompt sets never grow the cache beyond its byte budget."""
    probe = new_segmenter(tiny_checkpoint)
    entry_bytes = probe.encode_prompts(
        examples["images"][:1], examples["masks"][:1]
    ).encoding.nbytes()
    segmenter = new_segmenter(tiny_checkpoint, cache_bytes=3 * entry_bytes)
    sizes = []

    def encode(index: int) -> None:
        segmenter.encode_prompts(
            examples["images"][index % 6 : index % 6 + 1],
            [np.roll(examples["masks"][index % 6], index, axis=1)],
        )
        sizes.append(len(segmenter.cache))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(encode, range(24)))
    assert segmenter.cache.hits + segmenter.cache.misses == 24
    assert max(sizes) <= 3 and len(segmenter.cache) <= 3
