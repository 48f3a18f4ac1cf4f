"""The "vit" architecture through the product: ONNX export and ONNX Runtime parity, the Segmenter
(2D batches, volumes, prompt cache) and the CLI (segment, eval, bench, train), at the design of
configs/promptseg_vit_small.yaml scaled down so the suite stays fast."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import disk_example, write_png

from promptseg import Prompt, Segmenter
from promptseg.cli import main
from promptseg.engine.backends import create_backend
from promptseg.export.graphs import (
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    encoding_names,
    flatten_encoding,
)
from promptseg.export.onnx_export import export_onnx, graph_paths, read_onnx_metadata
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import load_model, save_weights
from promptseg.torch_threads import single_torch_thread

# Same relative float32 bound as tests/test_export_onnx.py (ONNX Runtime and ATen sum in other
# orders).
LOGIT_TOLERANCE = 1e-4


def small_vit(bottleneck: int) -> ModelConfig:
    """promptseg_vit_small's design (ViT encoder, transformer over pair and query tokens) at 32
    px."""
    return ModelConfig(
        architecture="vit",
        label_propagation=False,
        resolution=32,
        patch_size=8,
        encoder_depth=1,
        encoder_width=32,
        decoder_width=32,
        attention_depth=2,
        head_dim=16,
        mlp_ratio=2.0,
        bottleneck_tokens=bottleneck,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module", params=[0, 4], ids=["tokens", "bottleneck"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(request.param)
    path = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_weights(PromptSegNet(small_vit(request.param)), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> PromptSegNet:
    return load_model(checkpoint).eval().set_attention_kernel("sdpa")


@pytest.fixture(scope="module")
def onnx_dir(model: PromptSegNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit_onnx") / "graphs"
    export_onnx(model, out)
    return out


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("shots,batch", [(1, 1), (3, 4)])
def test_onnxruntime_graphs_match_eager(
    model: PromptSegNet, onnx_dir: Path, shots: int, batch: int
) -> None:
    """Both graphs in ONNX Runtime against the eager model, K and B other than the export's (2,
    2)."""
    g = torch.Generator().manual_seed(10 * shots + batch)
    images = torch.rand(1, shots, 3, 32, 32, generator=g)
    maps = (torch.rand(1, shots, 32, 32, generator=g) > 0.5).float()
    types = torch.randint(1, 5, (1, shots), generator=g)
    queries = torch.rand(batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        encoding = model.encode_prompts(images, maps, types)
        expected = model.decode(queries, encoding).numpy()
    paths = graph_paths(onnx_dir)
    encoder = onnxruntime.InferenceSession(
        str(paths["prompt_encoder"]), providers=["CPUExecutionProvider"]
    )
    decoder = onnxruntime.InferenceSession(
        str(paths["query_decoder"]), providers=["CPUExecutionProvider"]
    )
    feeds = dict(zip(PROMPT_INPUT_NAMES, (images.numpy(), maps.numpy(), types.numpy())))
    flat = encoder.run(None, feeds)
    for got, want in zip(flat, flatten_encoding(encoding)):
        assert got.shape == tuple(want.shape)
        assert relative_error(got, want.numpy()) <= LOGIT_TOLERANCE
    names = encoding_names(model.config)
    logits = decoder.run(None, {QUERY_INPUT_NAME: queries.numpy(), **dict(zip(names, flat))})[0]
    assert relative_error(logits, expected) <= LOGIT_TOLERANCE
    assert (
        json.loads(read_onnx_metadata(paths["query_decoder"])["model_config"])["architecture"]
        == "vit"
    )


def test_segmenter_onnxruntime_matches_torch(checkpoint: Path, onnx_dir: Path) -> None:
    """2D batch and a volume through the onnxruntime and torch backends of the Segmenter."""
    onnx_seg = Segmenter.from_checkpoint(
        checkpoint,
        device="cpu",
        backend="onnxruntime",
        backend_options={"model_dir": onnx_dir},
        max_batch=4,
    )
    torch_seg = Segmenter.from_checkpoint(checkpoint, device="cpu", backend="torch", max_batch=4)
    rng = np.random.default_rng(0)
    images = rng.random((3, 40, 48)).astype(np.float32)
    volume = rng.random((36, 30, 6)).astype(np.float32)
    masks = [(rng.random((40, 48)) > 0.6).astype(np.uint8) for _ in range(3)]
    box = [Prompt(image=volume[:, :, 0], kind="box", box=(4, 4, 20, 24))]
    flat, flat_ref = (
        seg.segment(images, seg.encode_prompts(images, masks)) for seg in (onnx_seg, torch_seg)
    )
    vol, vol_ref = (
        seg.segment_volume(volume, seg.encode_prompts(box), axis=2) for seg in (onnx_seg, torch_seg)
    )
    assert flat.shape == (3, 40, 48) and vol.probabilities.shape == volume.shape
    assert float(np.abs(flat - flat_ref).max()) <= LOGIT_TOLERANCE
    assert float(np.abs(vol.probabilities - vol_ref.probabilities).max()) <= LOGIT_TOLERANCE


def test_reference_backend_matches_sdpa_backend(model: PromptSegNet) -> None:
    reference = create_backend("torch", load_model_copy(model), "cpu")
    reference.model.set_attention_kernel("reference")
    sdpa = create_backend("torch", model, "cpu")
    g = torch.Generator().manual_seed(3)
    images, maps = (
        torch.rand(1, 2, 3, 32, 32, generator=g),
        (torch.rand(1, 2, 32, 32, generator=g) > 0.5).float(),
    )
    types, queries = torch.ones(1, 2, dtype=torch.long), torch.rand(3, 3, 32, 32, generator=g)
    a = reference.decode(queries, reference.encode(images, maps, types))
    b = sdpa.decode(queries, sdpa.encode(images, maps, types))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def load_model_copy(model: PromptSegNet) -> PromptSegNet:
    copy = PromptSegNet(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.fixture(scope="module")
def disk_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("disks") / "disks"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        image, mask = disk_example(rng, (40, 48))
        write_png(root / "images" / f"case{index}.png", image)
        write_png(root / "labels" / f"case{index}.png", mask)
    (root / "dataset.json").write_text(
        json.dumps({"name": "disks", "labels": {"background": 0, "disk": 1}})
    )
    return root


def test_cli_segment_eval_and_bench_with_a_vit_checkpoint(
    checkpoint: Path, disk_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, label = disk_dataset / "images" / "case0.png", disk_dataset / "labels" / "case0.png"
    query = disk_dataset / "images" / "case1.png"
    assert (
        main(
            [
                "segment",
                "--prompt",
                str(image),
                str(label),
                "--query",
                str(query),
                "--checkpoint",
                str(checkpoint),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "seg"),
                "--save-probabilities",
                "--no-progress",
            ]
        )
        == 0
    )
    probabilities = np.load(tmp_path / "seg" / "case1_prob.npy")
    assert probabilities.shape == (40, 48) and np.isfinite(probabilities).all()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--data",
                str(disk_dataset),
                "--shots",
                "1",
                "2",
                "--episodes",
                "2",
                "--queries",
                "2",
                "--checkpoint",
                str(checkpoint),
                "--methods",
                "promptseg",
                "--out",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    assert set(json.loads(report.read_text())["methods"]["promptseg"]["mean_over_tasks"]) == {
        "1",
        "2",
    }
    assert (
        main(
            [
                "bench",
                "--checkpoint",
                str(checkpoint),
                "--slices",
                "4",
                "--shots",
                "2",
                "--max-batch",
                "2",
                "--repeats",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "| cpu | 4 | 2 | 2 |" in capsys.readouterr().out


def test_cli_train_smoke_run_of_a_vit_config(disk_dataset: Path, tmp_path: Path) -> None:
    """`promptseg train --config` with a vit model section (the small config's design at 32 px)."""
    config = tmp_path / "vit.json"
    recipe = {
        "model": {k: v for k, v in small_vit(0).to_dict().items() if k != "extra"},
        "steps": 2,
        "episodes_per_step": 2,
        "shots": [1, 3],
        "queries": 2,
        "synthetic_fraction": 0.5,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "val_every": 100,
    }
    config.write_text(json.dumps(recipe))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(disk_dataset),
                "--config",
                str(config),
                "--out",
                str(run),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    trained = load_model(run / "final.safetensors")
    assert trained.config.architecture == "vit"
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def test_prompt_subsets_are_not_sliced_and_compile_padding_keeps_logits(
    model: PromptSegNet,
) -> None:
    """Prompt tokens of a vit model mix the prompts, so the ensemble re-encodes subsets instead of
    slicing; the compile backend's power-of-two padding of the prompt tokens (masked) changes
    nothing."""
    from promptseg.engine.backends.compile_backend import pad_prompt_tokens

    backend = create_backend("torch", model, "cpu")
    g = torch.Generator().manual_seed(9)
    images, maps = (
        torch.rand(1, 3, 3, 32, 32, generator=g),
        (torch.rand(1, 3, 32, 32, generator=g) > 0.5).float(),
    )
    types, queries = torch.ones(1, 3, dtype=torch.long), torch.rand(2, 3, 32, 32, generator=g)
    state = backend.encode(images, maps, types)
    assert backend.select_prompts(state, [0, 2], 3) is None
    padded = pad_prompt_tokens(state, 3)
    if model.config.bottleneck_tokens == 0:
        assert padded.keys[0][0].shape[2] == 4 * 2 * 16 and int(padded.key_lengths[0]) == 3 * 2 * 16
    torch.testing.assert_close(
        backend.decode(queries, padded), backend.decode(queries, state), atol=1e-5, rtol=0
    )
