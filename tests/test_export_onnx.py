"""ONNX export (two graphs, dynamic K and B) and the onnxruntime backend against the eager model.

The tiny model is exported once per module; every parity case runs on those two files, so
passing for K in {1, 3, 8} and B in {1, 5} shows that the prompt and batch axes are dynamic.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import TINY_CONFIG, tiny_checkpoint  # noqa: F401  (tiny_checkpoint is a fixture)

from promptseg import Prompt, Segmenter
from promptseg.engine.backends import backend_availability, create_backend
from promptseg.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from promptseg.errors import InputError
from promptseg.export import onnx_export
from promptseg.export.graphs import (
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    PromptEncoderGraph,
    encoding_names,
    flatten_encoding,
)
from promptseg.export.onnx_export import export_onnx, graph_paths, read_onnx_metadata
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import load_model, weights_sha256
from promptseg.torch_threads import single_torch_thread

# float32 tolerance on logits, relative to their largest magnitude (floored at 1). ONNX Runtime's
# MLAS kernels and PyTorch's ATen/oneDNN sum convolutions and matmuls in different orders and fuse
# LayerNorm/GELU differently: each op differs by a few float32 ulps (~1e-7 relative), and the ~40
# ops deep tiny model compounds that to ~1e-6 (measured: 2-4e-6). 1e-4 leaves room for other
# CPUs and thread counts, while a wrong op, weight or axis gives errors of order 1e-1 and above.
LOGIT_TOLERANCE = 1e-4
MIN_DICE = 0.99
SHOTS = (1, 3, 8)
BATCHES = (1, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for torch (and so for the backend): on a shared, busy CPU, OpenMP
    threads that wait for each other at every op make the tiny model's eager runs 10-100x slower."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> PromptSegNet:  # noqa: F811
    """The tiny model in eager float32 with SDPA attention: the reference for every comparison."""
    return load_model(tiny_checkpoint).eval().set_attention_kernel("sdpa")


@pytest.fixture(scope="module")
def onnx_dir(model: PromptSegNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the tiny model, shared by the module (read-only for the tests)."""
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    export_onnx(model, out)
    return out


@pytest.fixture(scope="module")
def backend(model: PromptSegNet, onnx_dir: Path) -> OnnxRuntimeBackend:
    return create_backend("onnxruntime", model, "cpu", model_dir=onnx_dir)


def random_prompts(shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh (1, K, C, R, R) images, (1, K, R, R) binary maps and (1, K) prompt types."""
    generator = torch.Generator().manual_seed(seed)
    r, c = TINY_CONFIG.resolution, TINY_CONFIG.in_channels
    images = torch.rand(1, shots, c, r, r, generator=generator)
    maps = (torch.rand(1, shots, r, r, generator=generator) > 0.5).float()
    types = torch.randint(1, TINY_CONFIG.num_prompt_types, (1, shots), generator=generator)
    return images, maps, types


def random_queries(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(
        batch,
        TINY_CONFIG.in_channels,
        TINY_CONFIG.resolution,
        TINY_CONFIG.resolution,
        generator=generator,
    )


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Max-abs error within LOGIT_TOLERANCE (relative to the logit scale) and Dice of logits > 0 >=
    MIN_DICE."""
    error = float(np.abs(actual - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    print(f"{what}: max-abs logit error {error:.2e} (scale {scale:.2f})", file=sys.stderr)
    assert error <= LOGIT_TOLERANCE * scale, f"{what}: max-abs logit error {error:.3e}"
    assert dice(actual > 0, expected > 0) >= MIN_DICE


def test_files_are_self_contained_with_named_dynamic_axes(onnx_dir: Path) -> None:
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "prompt_encoder.onnx",
        "query_decoder.onnx",
    ]
    assert not any(
        p.name.startswith(".") for p in onnx_dir.parent.iterdir()
    )  # no staging folder left
    names = encoding_names(TINY_CONFIG)
    expected = {
        "prompt_encoder": ({"prompt_images": 1, "prompt_maps": 1, "prompt_types": 1}, "prompts"),
        "query_decoder": ({QUERY_INPUT_NAME: 0}, "batch"),
    }
    for role, path in graph_paths(onnx_dir).items():
        proto = onnx.load(path, load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
        inputs = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in proto.graph.input
        }
        outputs = [v.name for v in proto.graph.output]
        axes, axis_name = expected[role]
        assert all(inputs[name][axis] == axis_name for name, axis in axes.items())
        assert outputs == (names if role == "prompt_encoder" else [LOGITS_NAME])
        assert {p.key for n in proto.graph.node for p in n.metadata_props}.isdisjoint(
            {"pkg.torch.onnx.stack_trace"}
        )
        assert proto.opset_import[0].version == onnx_export.DEFAULT_OPSET
    decoder = onnx.load(graph_paths(onnx_dir)["query_decoder"], load_external_data=False)
    token_axes = {
        v.name: v.type.tensor_type.shape.dim[2].dim_param
        for v in decoder.graph.input
        if v.name in names
    }
    assert token_axes == {name: f"tokens_s{onnx_export.stage_of(name)}" for name in names}


def test_metadata_is_present_and_describes_the_model(onnx_dir: Path, model: PromptSegNet) -> None:
    for role, path in graph_paths(onnx_dir).items():
        metadata = read_onnx_metadata(path)
        assert metadata["graph_role"] == role
        assert metadata["promptseg_version"] == onnx_export.promptseg_version() != "unknown"
        assert (metadata["resolution"], metadata["in_channels"]) == ("32", "3")
        assert ModelConfig.from_json(metadata["model_config"]) == TINY_CONFIG
        assert metadata["dtype"] == "float32"
        assert metadata["weights_sha256"] == weights_sha256(model)
        assert metadata["encoding_names"] == json.dumps(
            [
                "keys_s0_b0",
                "keys_s0_propagation",
                "keys_s1_b0",
                "keys_s1_propagation",
                "values_s0_b0",
                "values_s0_propagation",
                "values_s1_b0",
                "values_s1_propagation",
            ]
        )


@pytest.mark.parametrize("shots", SHOTS)
def test_prompt_encoder_graph_matches_eager(
    onnx_dir: Path, model: PromptSegNet, shots: int
) -> None:
    prompts = random_prompts(shots, seed=shots)
    with torch.no_grad():
        expected = PromptEncoderGraph(model)(*prompts)
    actual = session(graph_paths(onnx_dir)["prompt_encoder"]).run(
        encoding_names(TINY_CONFIG),
        {name: t.numpy() for name, t in zip(PROMPT_INPUT_NAMES, prompts)},
    )
    for got, want in zip(actual, expected):
        assert got.shape == tuple(want.shape) and want.shape[2] % shots == 0
        np.testing.assert_allclose(
            got, want.numpy(), rtol=0, atol=LOGIT_TOLERANCE * max(1.0, want.abs().max().item())
        )


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_query_decoder_graph_matches_eager(
    onnx_dir: Path, model: PromptSegNet, shots: int, batch: int
) -> None:
    """The eager encoding fed to the ONNX decoder isolates the decoder's error."""
    queries = random_queries(batch, seed=100 + 10 * shots + batch)
    with torch.no_grad():
        encoding = model.encode_prompts(*random_prompts(shots, seed=shots))
        expected = model.decode(queries, encoding).numpy()
    feeds = {QUERY_INPUT_NAME: queries.numpy()}
    feeds.update(
        {
            name: t.numpy()
            for name, t in zip(encoding_names(TINY_CONFIG), flatten_encoding(encoding))
        }
    )
    (actual,) = session(graph_paths(onnx_dir)["query_decoder"]).run([LOGITS_NAME], feeds)
    assert actual.shape == (batch, 32, 32)
    assert_logits_close(actual, expected, f"decoder graph K={shots} B={batch}")


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_backend_matches_eager_torch_backend(
    backend: OnnxRuntimeBackend, model: PromptSegNet, shots: int, batch: int
) -> None:
    prompts, queries = (
        random_prompts(shots, seed=7 * shots),
        random_queries(batch, seed=7 * shots + batch),
    )
    reference = create_backend("torch", model, "cpu")
    expected = reference.decode(queries, reference.encode(*prompts))
    state = backend.encode(*prompts)
    assert all(isinstance(t, np.ndarray) for t in state.tensors) and state.nbytes() > 0
    actual = backend.decode(queries, state)
    assert (
        actual.dtype == torch.float32
        and actual.device.type == "cpu"
        and actual.shape == (batch, 32, 32)
    )
    assert_logits_close(
        actual.numpy(), expected.numpy(), f"onnxruntime backend K={shots} B={batch}"
    )


def disk(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) <= radius**2


def test_segmenter_with_onnxruntime_matches_torch(tiny_checkpoint: Path, onnx_dir: Path) -> None:  # noqa: F811
    """2D batch and a volume (6 slices in batches of 4 and 2) through both backends."""
    onnx_seg = Segmenter.from_checkpoint(
        tiny_checkpoint,
        device="cpu",
        backend="onnxruntime",
        backend_options={"model_dir": onnx_dir},
        max_batch=4,
    )
    torch_seg = Segmenter.from_checkpoint(
        tiny_checkpoint, device="cpu", backend="torch", max_batch=4
    )
    assert onnx_seg.backend_name == "onnxruntime"
    rng = np.random.default_rng(0)
    images = rng.random((3, 40, 48)).astype(np.float32)
    volume = rng.random((36, 30, 6)).astype(np.float32)
    masks = [disk((40, 48), (20, 24), r) for r in (8, 10, 12)]
    box = [Prompt(image=volume[:, :, 0], kind="box", box=(4, 4, 20, 24))]
    flat, flat_ref = (
        seg.segment(images, seg.encode_prompts(images, masks)) for seg in (onnx_seg, torch_seg)
    )
    vol, vol_ref = (
        seg.segment_volume(volume, seg.encode_prompts(box), axis=2) for seg in (onnx_seg, torch_seg)
    )
    assert flat.shape == (3, 40, 48) and vol.probabilities.shape == volume.shape
    # Probabilities are sigmoids of the logits: their error is at most a quarter of the logits'.
    for what, actual, expected in (
        ("2D batch", flat, flat_ref),
        ("volume", vol.probabilities, vol_ref.probabilities),
    ):
        error = float(np.abs(actual - expected).max())
        print(f"segmenter {what}: max-abs probability error {error:.2e}", file=sys.stderr)
        assert error <= LOGIT_TOLERANCE and dice(actual > 0.5, expected > 0.5) >= MIN_DICE


def test_backend_without_model_dir_exports_once_to_a_temporary_folder(
    model: PromptSegNet, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export itself is the module fixture's; here the copy stands in for it to keep the test
    fast."""
    folders = []

    def fake_export(exported: PromptSegNet, folder: str) -> dict[str, Path]:
        assert exported is model
        folders.append(Path(folder))
        for path in graph_paths(onnx_dir).values():
            shutil.copy(path, folder)
        return graph_paths(folder)

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    backend = OnnxRuntimeBackend(model, torch.device("cpu"), threads=1)
    assert len(folders) == 1 and not folders[0].exists()
    prompts, queries = random_prompts(2, seed=5), random_queries(2, seed=6)
    with torch.no_grad():
        expected = model(*prompts, queries).numpy()
    assert_logits_close(
        backend.decode(queries, backend.encode(*prompts)).numpy(), expected, "exported on the fly"
    )


def test_export_refuses_to_overwrite(onnx_dir: Path, model: PromptSegNet) -> None:
    before = {p: p.stat().st_mtime_ns for p in onnx_dir.iterdir()}
    with pytest.raises(
        InputError, match=r"prompt_encoder\.onnx: output exists; pass --overwrite to replace it"
    ):
        export_onnx(model, onnx_dir)
    assert {p: p.stat().st_mtime_ns for p in onnx_dir.iterdir()} == before


def test_failed_export_leaves_no_partial_file(
    model: PromptSegNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_proto = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))

    def half_written(proto: onnx.ModelProto, path: Path) -> Path:
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(
        onnx_export,
        "export_protos",
        lambda *args: {role: tiny_proto for role in onnx_export.GRAPH_ROLES},
    )
    monkeypatch.setattr(onnx_export, "save_checked", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files_are_named(onnx_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing\.onnx: not found"):
        read_onnx_metadata(tmp_path / "nothing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(InputError, match=r"garbage\.onnx: not a readable ONNX file"):
        read_onnx_metadata(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(graph_paths(onnx_dir)["query_decoder"].read_bytes()[:5000])
    with pytest.raises(InputError, match=r"truncated\.onnx: "):
        read_onnx_metadata(truncated)
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])), foreign)
    with pytest.raises(InputError, match=r"foreign\.onnx: not a promptseg ONNX export"):
        read_onnx_metadata(foreign)


def test_graphs_whose_weights_changed_after_export_are_refused(
    model: PromptSegNet, onnx_dir: Path, tmp_path: Path
) -> None:
    """Zeroed initializers under the genuine metadata (weights_sha256 included) are refused by the
    backend, and so is a graph whose metadata lacks the tensor digest (an older export)."""
    altered = tmp_path / "altered"
    shutil.copytree(onnx_dir, altered)
    path = graph_paths(altered)["query_decoder"]
    proto = onnx.load(path)
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    zeros = onnx.numpy_helper.to_array(biggest) * 0
    biggest.CopyFrom(onnx.numpy_helper.from_array(zeros, biggest.name))
    onnx.save(proto, path)
    with pytest.raises(
        InputError,
        match=r"query_decoder\.onnx: its weights do not match the digest recorded at export",
    ):
        OnnxRuntimeBackend(model, torch.device("cpu"), model_dir=altered)
    shutil.copy(graph_paths(onnx_dir)["query_decoder"], path)
    proto = onnx.load(path)
    kept = [p for p in proto.metadata_props if p.key != onnx_export.GRAPH_TENSORS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, path)
    with pytest.raises(
        InputError, match=r"query_decoder\.onnx: its metadata records no graph_tensors_sha256"
    ):
        OnnxRuntimeBackend(model, torch.device("cpu"), model_dir=altered)


def test_the_tensorrt_builder_refuses_graphs_changed_after_export(
    onnx_dir: Path, tmp_path: Path
) -> None:
    """The builder reads the graphs' metadata through the same tensor digest check as the runtime
    (no TensorRT needed for this step)."""
    from promptseg.export.tensorrt_build import check_graphs_unchanged

    altered = tmp_path / "altered"
    shutil.copytree(onnx_dir, altered)
    path = graph_paths(altered)["prompt_encoder"]
    proto = onnx.load(path)
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    biggest.CopyFrom(
        onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(biggest) * 0, biggest.name)
    )
    onnx.save(proto, path)
    check_graphs_unchanged(graph_paths(onnx_dir))
    with pytest.raises(
        InputError,
        match=r"prompt_encoder\.onnx: its weights do not match the digest recorded at export",
    ):
        check_graphs_unchanged(graph_paths(altered))


def test_backend_names_the_missing_file(model: PromptSegNet, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"prompt_encoder\.onnx: not found"):
        OnnxRuntimeBackend(model, torch.device("cpu"), model_dir=tmp_path)


def test_mismatching_metadata_is_refused(
    model: PromptSegNet, onnx_dir: Path, tmp_path: Path
) -> None:
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    with pytest.raises(InputError, match=r"prompt_encoder\.onnx: was exported from other weights"):
        OnnxRuntimeBackend(PromptSegNet(TINY_CONFIG), cpu, model_dir=onnx_dir)
    bigger = ModelConfig(**{**TINY_CONFIG.to_dict(), "resolution": 64})
    with pytest.raises(
        InputError,
        match=r"prompt_encoder\.onnx: was exported for resolution 32, but the model has resolution "
        r"64",
    ):
        OnnxRuntimeBackend(PromptSegNet(bigger), cpu, model_dir=onnx_dir)
    fewer_prompts = ModelConfig(**{**TINY_CONFIG.to_dict(), "max_prompts": 8})
    with pytest.raises(InputError, match=r"another model configuration \(differs in max_prompts\)"):
        OnnxRuntimeBackend(PromptSegNet(fewer_prompts), cpu, model_dir=onnx_dir)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(graph_paths(onnx_dir)["prompt_encoder"], swapped / "prompt_encoder.onnx")
    shutil.copy(graph_paths(onnx_dir)["prompt_encoder"], swapped / "query_decoder.onnx")
    with pytest.raises(InputError, match=r"query_decoder\.onnx: holds the prompt_encoder graph"):
        OnnxRuntimeBackend(model, cpu, model_dir=swapped)


def test_availability_gives_one_line_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OnnxRuntimeBackend.availability(torch.device("cpu")) == (True, "")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        ok, why = backend_availability("onnxruntime", "cuda")
        assert not ok and "CUDAExecutionProvider" in why and "\n" not in why
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    ok, why = OnnxRuntimeBackend.availability(torch.device("cpu"))
    assert not ok and why.startswith("onnxruntime backend unavailable:") and "\n" not in why


def test_cli_segment_with_exported_graphs_matches_torch(
    tiny_checkpoint: Path,
    onnx_dir: Path,
    tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`promptseg segment --backend onnxruntime --export-dir DIR` writes the same probabilities as
    --backend torch."""
    from PIL import Image

    from promptseg.cli import main

    rng = np.random.default_rng(11)
    image = (rng.random((40, 40)) * 255).astype(np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:25, 12:30] = 255
    Image.fromarray(image).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    common = [
        "segment",
        "--prompt",
        str(tmp_path / "p.png"),
        str(tmp_path / "m.png"),
        "--query",
        str(tmp_path / "p.png"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--save-probabilities",
        "--no-progress",
    ]
    assert main(common + ["--out", str(tmp_path / "torch"), "--backend", "torch"]) == 0
    assert (
        main(
            common
            + [
                "--out",
                str(tmp_path / "ort"),
                "--backend",
                "onnxruntime",
                "--export-dir",
                str(onnx_dir),
            ]
        )
        == 0
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "ort" / "p_prob.npy"),
        np.load(tmp_path / "torch" / "p_prob.npy"),
        atol=1e-5,
    )
    capsys.readouterr()
    assert (
        main(
            common
            + ["--out", str(tmp_path / "bad"), "--backend", "torch", "--export-dir", str(onnx_dir)]
        )
        == 2
    )
    assert "--export-dir: only --backend onnxruntime or tensorrt" in capsys.readouterr().err
