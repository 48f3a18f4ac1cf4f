"""Engine behaviour: backend registry, out-of-memory split and retry, multi-label, compile backend
parity."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from promptseg.cli import main
from promptseg.engine import LabelResult, Segmenter
from promptseg.engine.backends import (
    ENGINE_BACKENDS,
    BackendUnavailable,
    backend_availability,
    create_backend,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.model.weights import load_model
from tests.helpers import disk_example, tiny_checkpoint, write_nifti, write_png  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def segmenter(tiny_checkpoint: Path) -> Segmenter:
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=8)


def two_label_examples(
    rng: np.random.Generator, count: int, size: int = 48
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` images (H, W) uint8 with a bright disk (label 1) and a dark square (label 2), and
    their label maps."""
    images, maps = [], []
    for _ in range(count):
        image, disk = disk_example(rng, (size, size))
        label_map = disk.copy()
        y, x = rng.integers(2, size // 3, 2)
        label_map[y : y + 8, x : x + 8] = 2
        image = np.where(label_map == 2, 20, image).astype(np.uint8)
        images.append(image)
        maps.append(label_map)
    return images, maps


def test_unknown_and_unavailable_backends_say_why(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'"):
        create_backend("fast", model, "cpu")
    for name in ENGINE_BACKENDS:
        ok, why = backend_availability(name, "cpu")
        assert ok or (why and "\n" not in why), name
    if not torch.cuda.is_available():
        ok, why = backend_availability("tensorrt", "cpu")
        assert not ok and ("tensorrt" in why.lower() or "cuda" in why.lower())


def test_cli_unavailable_backend_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend_availability("tensorrt", "cpu")[0]:
        pytest.skip("tensorrt is available here")
    image, mask = disk_example(np.random.default_rng(0), (32, 32))
    write_png(tmp_path / "p.png", image), write_png(tmp_path / "m.png", mask * 255)
    code = main(
        [
            "segment",
            "--prompt",
            str(tmp_path / "p.png"),
            str(tmp_path / "m.png"),
            "--query",
            str(tmp_path / "p.png"),
            "--out",
            str(tmp_path / "out"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--backend",
            "tensorrt",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--backend" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_out_of_memory_halves_the_batch_and_retries(
    segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulated CUDA OOM above 3 queries per call: results equal the unconstrained run, batch
    settles at 2."""
    rng = np.random.default_rng(1)
    images, masks = zip(*(disk_example(rng, (40, 40)) for _ in range(3)))
    queries = np.stack([disk_example(rng, (40, 40))[0] for _ in range(11)])
    prompts = segmenter.encode_prompts(list(images), list(masks))
    expected = segmenter.segment(queries, prompts)
    decode = segmenter.backend.decode
    sizes: list[int] = []

    def limited(batch: torch.Tensor, state: object) -> torch.Tensor:
        sizes.append(batch.shape[0])
        if batch.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(batch, state)

    monkeypatch.setattr(segmenter.backend, "decode", limited)
    result = segmenter.segment(queries, prompts)
    np.testing.assert_allclose(
        result, expected, atol=1e-5
    )  # smaller batches may pick other CPU conv kernels
    assert sizes[:3] == [8, 4, 2] and max(s for s in sizes if s <= 3) == 2
    assert segmenter.max_batch == 2
    volume = segmenter.segment_volume(np.transpose(queries, (1, 2, 0)).astype(np.float32), prompts)
    assert volume.probabilities.shape == (40, 40, 11)


def test_out_of_memory_at_batch_one_is_a_clear_error(
    segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, mask = disk_example(np.random.default_rng(2), (32, 32))
    prompts = segmenter.encode_prompts([image], [mask])

    def always(batch: torch.Tensor, state: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(segmenter.backend, "decode", always)
    with pytest.raises(PromptSegError, match="out of memory decoding a single query"):
        segmenter.segment([image], prompts)


def test_out_of_memory_frees_the_failed_batch_before_emptying_the_cache(
    segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is emptied only once the failed call's tensors are unreachable: inside the except
    block the error's traceback still holds the frames that reference them."""
    image, mask = disk_example(np.random.default_rng(8), (32, 32))
    prompts = segmenter.encode_prompts([image], [mask])
    decode = segmenter.backend.decode
    failed: list[weakref.ref] = []
    alive_at_release: list[bool] = []

    def limited(batch: torch.Tensor, state: object) -> torch.Tensor:
        if batch.shape[0] > 1:
            activations = torch.empty(1024)  # stands in for the failed batch's intermediate tensors
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(batch, state)

    monkeypatch.setattr(segmenter.backend, "decode", limited)
    monkeypatch.setattr(
        segmenter,
        "_release_cached_memory",
        lambda: alive_at_release.append(failed[-1]() is not None),
    )
    assert segmenter.segment(np.stack([image] * 3), prompts).shape == (3, 32, 32)
    assert alive_at_release and not any(alive_at_release)


def test_out_of_memory_while_encoding_prompts(
    segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An out-of-memory error encoding prompts empties the prompt cache (encodings hold device
    memory) and retries once; a second one is a one-line PromptSegError."""
    rng = np.random.default_rng(9)
    (image, mask), (other, other_mask) = disk_example(rng, (32, 32)), disk_example(rng, (32, 32))
    segmenter.encode_prompts([image], [mask])
    assert len(segmenter.cache) == 1
    encode = segmenter.backend.encode
    calls: list[int] = []

    def once(images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> object:
        calls.append(images.shape[1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return encode(images, maps, types)

    monkeypatch.setattr(segmenter.backend, "encode", once)
    prompts = segmenter.encode_prompts([other, image], [other_mask, mask])
    assert (
        calls == [2, 2] and prompts.num_prompts == 2 and len(segmenter.cache) == 1
    )  # the old entry was dropped

    def always(images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(segmenter.backend, "encode", always)
    with pytest.raises(
        PromptSegError, match="out of memory encoding 1 prompts with the torch backend"
    ) as caught:
        segmenter.encode_prompts([other], [other_mask])
    assert "\n" not in str(caught.value)


def test_max_batch_is_lowered_to_the_backend_limit(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: F811
    """A backend with a batch limit (a TensorRT engine's max_batch; here a torch backend given one)
    lowers a larger Segmenter max_batch to it, with a warning, and no decode call exceeds it."""
    import promptseg.engine.segmenter as segmenter_module

    create = segmenter_module.create_backend
    sizes: list[int] = []

    def limited_backend(*args: object, **kwargs: object) -> object:
        backend = create(*args, **kwargs)
        backend.max_batch = 3
        decode = backend.decode

        def recording(batch: torch.Tensor, state: object) -> torch.Tensor:
            sizes.append(batch.shape[0])
            return decode(batch, state)

        backend.decode = recording
        return backend

    monkeypatch.setattr(segmenter_module, "create_backend", limited_backend)
    with pytest.warns(
        UserWarning, match="max_batch 8 exceeds the torch backend's limit of 3 queries; using 3"
    ):
        segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=8)
    assert segmenter.max_batch == 3
    image, mask = disk_example(np.random.default_rng(10), (32, 32))
    segmenter.segment(np.stack([image] * 7), segmenter.encode_prompts([image], [mask]))
    assert sizes == [3, 3, 1]
    assert Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=2).max_batch == 2


def test_multi_label_matches_per_label_calls(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(3)
    images, maps = two_label_examples(rng, 3)
    queries = np.stack(two_label_examples(rng, 2)[0])
    encoded = segmenter.encode_labels(images, maps)
    assert sorted(encoded) == [1, 2]
    results = segmenter.segment_labels(queries, encoded, threshold=0.5)
    assert len(results) == 2 and results[0].probabilities.shape == (2, 48, 48)
    for label, prompts in encoded.items():
        single = segmenter.segment(queries, segmenter.encode_prompts(images, maps, label=label))
        np.testing.assert_array_equal(
            np.stack([r.probabilities[label - 1] for r in results]), single
        )
    label_map = results[0].label_map
    assert label_map.dtype == np.uint8 and set(np.unique(label_map)) <= {0, 1, 2}


def test_label_map_takes_most_probable_label_above_threshold() -> None:
    probabilities = np.array(
        [[[0.9, 0.2, 0.6]], [[0.7, 0.4, 0.8]]], dtype=np.float32
    )  # (L=2, 1, 3)
    result = LabelResult((3, 7), probabilities, threshold=0.5)
    np.testing.assert_array_equal(result.label_map, [[3, 0, 7]])


def test_multi_label_errors(segmenter: Segmenter) -> None:
    images, maps = two_label_examples(np.random.default_rng(4), 2)
    with pytest.raises(InputError, match="label 5 appears in none"):
        segmenter.encode_labels(images, maps, labels=[1, 5])
    with pytest.raises(InputError, match="no foreground"):
        segmenter.encode_labels(images, [np.zeros_like(m) for m in maps])


def test_multi_label_volume_streams_all_labels(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(5)
    images, maps = two_label_examples(rng, 2)
    encoded = segmenter.encode_labels(images, maps)
    volume = rng.random((48, 48, 5)).astype(np.float32)
    result = segmenter.segment_volume_labels(volume, encoded, axis=2)
    assert result.probabilities.shape == (2, 48, 48, 5)
    np.testing.assert_array_equal(
        result.probabilities[1], segmenter.segment_volume(volume, encoded[2]).probabilities
    )


def test_cli_several_labels_write_a_label_map(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(6)
    images, maps = two_label_examples(rng, 2)
    args = ["segment"]
    for n, (image, label_map) in enumerate(zip(images, maps)):
        args += [
            "--prompt",
            str(write_png(tmp_path / f"p{n}.png", image)),
            str(write_png(tmp_path / f"m{n}.png", label_map)),
        ]
    query = write_nifti(tmp_path / "q.nii.gz", rng.random((48, 48, 3)).astype(np.float32))
    code = main(
        args
        + [
            "--label",
            "1",
            "2",
            "--query",
            str(query),
            str(tmp_path / "p0.png"),
            "--out",
            str(tmp_path / "out"),
            "--save-probabilities",
            "--overlay",
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "p0_mask.png",
        "p0_overlay.png",
        "p0_prob_label1.npy",
        "p0_prob_label2.npy",
        "q_mask.nii.gz",
        "q_overlay.png",
        "q_prob_label1.nii.gz",
        "q_prob_label2.nii.gz",
    ]
    assert np.load(tmp_path / "out" / "p0_prob_label2.npy").shape == (48, 48)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="compile backend needs a C++ compiler on the CPU",
)
def test_compile_backend_matches_eager_on_bucketed_shapes(tiny_checkpoint: Path) -> None:
    """torch.compile (Inductor, CPU) against eager: max-abs logit error <= 1e-4 (fp32, reordered
    reductions), for 3 and 4 prompts and batches of 3 and 4 queries, which share one bucketed
    shape: the decoder compiles once (`compiled_shapes`)."""
    rng = np.random.default_rng(7)
    pairs = [disk_example(rng, (32, 32)) for _ in range(4)]
    queries = np.stack([disk_example(rng, (32, 32))[0] for _ in range(4)])
    backends = {
        name: Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", backend=name)
        for name in ("torch", "compile")
    }
    for shots in (3, 4):
        for count in (3, 4):
            results = {}
            for name, seg in backends.items():
                images, masks = zip(*pairs[:shots])
                prompts = seg.encode_prompts(list(images), list(masks))
                batch = (
                    torch.from_numpy(queries[:count, None] / 255.0)
                    .float()
                    .expand(-1, seg.channels, -1, -1)
                )
                results[name] = seg.backend.decode(batch, prompts.encoding)
            assert results["compile"].shape == (count, 32, 32)
            assert (results["torch"] - results["compile"]).abs().max().item() <= 1e-4
    assert len(backends["compile"].backend.compiled_shapes) == 1
