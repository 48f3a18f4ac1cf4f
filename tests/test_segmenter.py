"""Segmenter: packaged weights, 2D and 3D inference back in the input's size, the prompt cache."""

from __future__ import annotations

import numpy as np
import pytest

from promptseg import Prompt, Segmenter
from promptseg.errors import InputError
from promptseg.model import count_parameters
from promptseg.model.weights import packaged_weights_path


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained(device="cpu", max_batch=4)


def disk(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) <= radius**2


def test_packaged_weights_are_small_real_and_load_offline(segmenter: Segmenter) -> None:
    assert packaged_weights_path().stat().st_size < 16 * 2**20
    assert count_parameters(segmenter.model) < 8_000_000


def test_segment_returns_each_query_at_its_own_size(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((90, 70)).astype(np.float32)
    mask = disk((90, 70), (45, 35), 12)
    prompts = segmenter.encode_prompts([image], [mask])
    same = segmenter.segment(np.stack([image, image]), prompts)
    assert same.shape == (2, 90, 70) and same.dtype == np.float32
    assert 0.0 <= same.min() and same.max() <= 1.0
    other = rng.random((40, 50, 3))
    mixed = segmenter.segment_each([image, other], prompts)
    assert [m.shape for m in mixed] == [(90, 70), (40, 50)]
    np.testing.assert_array_equal(mixed[0], same[0])
    with pytest.raises(
        InputError, match=r"query 1: size 50x40 differs from query 0's 70x90; .* use segment_each"
    ):
        segmenter.segment([image, other], prompts)


def test_prompt_cache_reuses_an_encoding(segmenter: Segmenter) -> None:
    image = np.random.default_rng(1).random((64, 64))
    mask = disk((64, 64), (30, 30), 10)
    first = segmenter.encode_prompts([image], [mask])
    hits = segmenter.cache.hits
    second = segmenter.encode_prompts([image.copy()], [mask.copy()])
    assert second.key == first.key and segmenter.cache.hits == hits + 1
    assert second.encoding is first.encoding


def test_volume_keeps_its_grid_and_matches_slice_by_slice(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(2)
    volume = rng.random((40, 36, 6)).astype(np.float32)
    prompts = segmenter.encode_prompts(
        [Prompt(image=volume[:, :, 0], kind="box", box=(5, 5, 20, 25))]
    )
    result = segmenter.segment_volume(volume, prompts, axis=2)
    assert result.probabilities.shape == volume.shape
    one = segmenter.segment([volume[:, :, 3]], prompts)[0]
    np.testing.assert_allclose(result.probabilities[:, :, 3], one, atol=1e-5)


def test_label_selection_and_absent_label(segmenter: Segmenter) -> None:
    image = np.random.default_rng(3).random((48, 48))
    labels = disk((48, 48), (20, 20), 8).astype(np.uint8) * 2
    segmenter.encode_prompts([image], [labels], label=2)
    with pytest.raises(InputError, match="requested label 5 is absent"):
        segmenter.encode_prompts([image], [labels], label=5)
