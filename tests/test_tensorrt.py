"""TensorRT export and backend.

Everywhere: the optimisation-profile shapes against the eager graphs, argument checks, the sidecar
checks, availability reasons, the error when tensorrt cannot be used, and the TensorRT version
guard (10: precision flags, 11: strongly typed builds from an ONNX export of the engine's dtype,
others refused) against stand-in tensorrt modules. With the tensorrt package (TensorRT 10 or 11)
and a CUDA GPU: engines built from a tiny model's ONNX export, their parity with the eager float32
model, the timing cache and the sidecar.

Tolerances (max |logit error| over all pixels, logits of the tiny model span about -1.7..1.9):
  fp32  1e-3: TF32 is off in fp32 engines, so only summation order and TensorRT's fused kernels
        differ from the eager float32 model on the CPU (typically ~1e-5).
  fp16  5e-2: the whole tiny model run in float16 in eager PyTorch differs by at most 8.4e-3 over
        these K and B (bfloat16: 5.9e-2); TensorRT keeps some layers in float32, so 5e-2 leaves
        a ~6x margin. Dice of the masks (logit > 0) >= 0.98: eager float16 reached >= 0.999.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from promptseg.engine.backends import backend_availability
from promptseg.engine.backends.base import FlatPromptState
from promptseg.engine.backends.tensorrt_backend import TensorRTBackend, check_sidecar, torch_dtype
from promptseg.engine.backends.tensorrt_runtime import (
    SIDECAR_NAME,
    import_tensorrt,
    read_sidecar,
    strongly_typed,
    tensorrt_module,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.export.graphs import (
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    PromptEncoderGraph,
    QueryDecoderGraph,
    encoding_names,
    example_inputs,
)
from promptseg.export.tensorrt_build import (
    _builder_config,
    build_engines,
    onnx_dtype_for,
    profile_shapes,
)
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import load_model, weights_sha256
from tests.helpers import TINY_CONFIG, disk_example, tiny_checkpoint  # noqa: F401

_TRT, _TRT_WHY = tensorrt_module()
if _TRT is None:
    _SKIP_REASON = f"needs the tensorrt package (TensorRT 10 or 11): {_TRT_WHY}"
elif not torch.cuda.is_available():
    _SKIP_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False"
else:
    _SKIP_REASON = ""
needs_tensorrt = pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON or "runnable")

FP32_TOLERANCE = 1e-3
FP16_TOLERANCE = 5e-2
FP16_MIN_DICE = 0.98
MAX_BATCH, MAX_PROMPTS = 8, 8


# --- profile shapes against the eager graphs (CPU) ---------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TINY_CONFIG,
        ModelConfig(),
        ModelConfig(
            resolution=32,
            widths=(8, 16, 32, 32),
            head_dim=16,
            attention_depth=1,
            blocks_per_stage=1,
            bottleneck_tokens=4,
            label_propagation=False,
        ),
    ],
    ids=["tiny", "default", "tiny-bottleneck"],
)
def test_profile_shapes_match_the_eager_graphs(config: ModelConfig) -> None:
    """Every graph input is in the profile, and min/opt/max equal the shapes the eager graphs
    consume and produce at (B, K) = (1, 1), (2, 3), (5, 3)."""
    torch.manual_seed(0)
    model = PromptSegNet(config).eval()
    encoder, decoder = PromptEncoderGraph(model), QueryDecoderGraph(model)
    batches, prompts = (1, 2, 5), (1, 3, 3)
    profile = profile_shapes(config, batches, prompts)
    assert set(profile) == {*PROMPT_INPUT_NAMES, QUERY_INPUT_NAME, *encoding_names(config)}
    for level, (batch, shots) in enumerate(zip(batches, prompts)):
        (images, maps, types), queries = example_inputs(config, shots=shots, batch=batch)
        with torch.no_grad():
            encoding = encoder(images, maps, types)
            logits = decoder(queries, *encoding)
        for name, tensor in zip(PROMPT_INPUT_NAMES, (images, maps, types)):
            assert profile[name][level] == tuple(tensor.shape), name
        assert profile[QUERY_INPUT_NAME][level] == tuple(queries.shape)
        for name, tensor in zip(encoding_names(config), encoding):
            assert profile[name][level] == tuple(tensor.shape), (name, level)
        assert tuple(logits.shape) == (batch, config.resolution, config.resolution)


# --- argument, sidecar and availability checks (CPU) -------------------------------------------


@pytest.fixture()
def fake_onnx_dir(tmp_path: Path) -> Path:
    """Two empty ONNX graphs carrying export_onnx's metadata for the tiny model: enough for the
    checks build_engines makes before TensorRT runs."""
    onnx_export = pytest.importorskip(
        "promptseg.export.onnx_export", reason="the ONNX exporter needs onnx"
    )
    helper = onnx_export.onnx.helper
    torch.manual_seed(0)
    model = PromptSegNet(TINY_CONFIG)
    for role in ("prompt_encoder", "query_decoder"):
        proto = helper.make_model(helper.make_graph([], role, [], []))
        helper.set_model_props(proto, onnx_export.graph_metadata(model, role, torch.float32))
        onnx_export.onnx.save(proto, str(tmp_path / f"{role}.onnx"))
    return tmp_path


@pytest.mark.parametrize(
    ("options", "source"),
    [
        ({"precision": "int8"}, "precision"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
        ({"max_prompts": 4, "opt_prompts": 0}, "opt_prompts"),
        ({"max_prompts": TINY_CONFIG.max_prompts + 1}, "max_prompts"),
    ],
)
def test_build_engines_rejects_bad_arguments(
    fake_onnx_dir: Path, options: dict, source: str
) -> None:
    with pytest.raises(InputError) as caught:
        build_engines(fake_onnx_dir, fake_onnx_dir / "out", **options)
    assert caught.value.source == source and "\n" not in str(caught.value)


def test_build_engines_names_missing_onnx_and_refuses_to_overwrite(
    fake_onnx_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="prompt_encoder.onnx: ONNX graph not found"):
        build_engines(tmp_path / "nowhere", tmp_path / "out")
    (fake_onnx_dir / "prompt_encoder.plan").write_bytes(b"old")
    with pytest.raises(
        InputError, match="prompt_encoder.plan: output exists; pass --overwrite to replace it"
    ):
        build_engines(fake_onnx_dir, fake_onnx_dir)
    assert (fake_onnx_dir / "prompt_encoder.plan").read_bytes() == b"old"


@pytest.mark.skipif(not _SKIP_REASON, reason="tensorrt and a CUDA GPU are available here")
def test_build_engines_without_tensorrt_says_why(fake_onnx_dir: Path) -> None:
    with pytest.raises(PromptSegError) as caught:
        build_engines(fake_onnx_dir, fake_onnx_dir / "out")
    message = str(caught.value)
    assert message.startswith(
        "tensorrt export needs the tensorrt package (TensorRT 10 or 11) and a CUDA GPU: "
    )
    assert "\n" not in message and not (fake_onnx_dir / "out").exists()


def test_availability_reason_is_one_line() -> None:
    ok, why = TensorRTBackend.availability(torch.device("cpu"))
    assert not ok and "\n" not in why and ("tensorrt" in why.lower() or "cuda" in why.lower())
    if _SKIP_REASON:
        assert backend_availability("tensorrt", "cuda") == (False, why)


def test_sidecar_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"{SIDECAR_NAME}: not found"):
        read_sidecar(tmp_path)
    (tmp_path / SIDECAR_NAME).write_text("{not json")
    with pytest.raises(InputError, match="unreadable TensorRT sidecar"):
        read_sidecar(tmp_path)
    pytest.importorskip(
        "onnx", reason="the weights digest lives in the ONNX exporter, which needs onnx"
    )
    model = PromptSegNet(TINY_CONFIG)
    other = ModelConfig(resolution=64, widths=(8, 16, 32, 32), head_dim=16)
    with pytest.raises(InputError, match=r"another model configuration \(differs in .*resolution"):
        check_sidecar({"config": json.loads(other.to_json())}, model, None, tmp_path / SIDECAR_NAME)
    sidecar = {"config": json.loads(TINY_CONFIG.to_json()), "weights_sha256": "0" * 64}
    with pytest.raises(InputError, match=f"{SIDECAR_NAME}: engines were built from other weights"):
        check_sidecar(sidecar, model, None, tmp_path / SIDECAR_NAME)


def test_torch_dtype_mapping() -> None:
    class FakeDataType:
        def __init__(self, name: str) -> None:
            self.name = name

    assert torch_dtype(FakeDataType("HALF")) is torch.float16
    assert torch_dtype(FakeDataType("INT64")) is torch.int64
    with pytest.raises(TypeError, match="FP8"):
        torch_dtype(FakeDataType("FP8"))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_onnx_export_feeds_the_builder(tiny_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    """build_engines finds export_onnx's files and reads the config and weights digest from their
    metadata; the graphs' input names and static dimensions agree with the profile shapes."""
    onnx_export = pytest.importorskip(
        "promptseg.export.onnx_export", reason="the ONNX exporter needs onnx"
    )
    from promptseg.export.graphs import GRAPH_ROLES as ROLES
    from promptseg.export.graphs import graph_path as onnx_path
    from promptseg.export.tensorrt_build import read_graph_metadata

    model = load_model(tiny_checkpoint)
    written = onnx_export.export_onnx(model, tmp_path)
    sources = {role: onnx_path(tmp_path, role) for role in ROLES}
    assert written == sources == onnx_export.graph_paths(tmp_path)
    config, metadata = read_graph_metadata(sources)
    assert config == TINY_CONFIG and metadata["weights_sha256"] == weights_sha256(model)
    profile = profile_shapes(TINY_CONFIG, (1, 2, 5), (1, 3, 3))
    expected = {
        "prompt_encoder": set(PROMPT_INPUT_NAMES),
        "query_decoder": {QUERY_INPUT_NAME, *encoding_names(config)},
    }
    for role, path in sources.items():
        inputs = onnx_export.onnx.load(str(path)).graph.input
        assert {value.name for value in inputs} == expected[role]
        for value in inputs:
            dims = [
                d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim
            ]
            for level in profile[value.name]:
                assert len(dims) == len(level) and all(d in (-1, s) for d, s in zip(dims, level)), (
                    value.name
                )
    swapped = {
        "prompt_encoder": sources["query_decoder"],
        "query_decoder": sources["prompt_encoder"],
    }
    with pytest.raises(
        InputError, match="holds the query_decoder graph, expected the prompt_encoder"
    ):
        read_graph_metadata(swapped)


# --- the TensorRT version guard, against stand-in tensorrt modules (CPU) ---------------------


def stand_in_tensorrt(version: str) -> ModuleType:
    """A module object named tensorrt with `version` and the builder-flag enum of that major
    release: FP16 and BF16 exist up to TensorRT 10 and were removed in 11 (getattr raises
    AttributeError)."""
    module = ModuleType("tensorrt")
    module.__version__ = version
    flags = (
        {"TF32": "TF32"}
        if version.startswith("11")
        else {"TF32": "TF32", "FP16": "FP16", "BF16": "BF16"}
    )
    module.BuilderFlag = SimpleNamespace(**flags)
    module.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    return module


class RecordingBuilderConfig:
    """Stands in for IBuilderConfig: records the flags set and cleared."""

    def __init__(self) -> None:
        self.set_flags: list[str] = []
        self.cleared_flags: list[str] = []

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        assert pool == "WORKSPACE" and size > 0

    def set_flag(self, flag: str) -> None:
        self.set_flags.append(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared_flags.append(flag)

    def create_timing_cache(self, data: bytes) -> object:
        return object()

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        return True


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("10.0.1", True),
        ("10.13.3.9", True),
        ("11.4.0.9", True),
        ("9.3.0", False),
        ("12.0.0", False),
        ("rc", False),
    ],
)
def test_tensorrt_version_guard(
    monkeypatch: pytest.MonkeyPatch, version: str, supported: bool
) -> None:
    """TensorRT 10 and 11 are used; any other version (or an unreadable one) is refused in one
    line."""
    stand_in = stand_in_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    trt, why = tensorrt_module()
    if supported:
        assert trt is stand_in and why == "" and import_tensorrt() is stand_in
        return
    assert trt is None and version in why and "10 and 11" in why and "\n" not in why
    with pytest.raises(PromptSegError) as caught:
        import_tensorrt()
    assert "\n" not in str(caught.value) and version in str(caught.value)
    assert not TensorRTBackend.availability(torch.device("cuda"))[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_builder_flags_follow_the_tensorrt_version(precision: str) -> None:
    """TensorRT 10 sets the FP16 / BF16 flag; TensorRT 11, which removed them, sets none (strong
    typing takes the graph's types); fp32 turns TF32 off in both."""
    builder = SimpleNamespace(create_builder_config=RecordingBuilderConfig)
    ten = _builder_config(stand_in_tensorrt("10.13.0"), builder, precision, 1.0, b"")
    eleven = _builder_config(stand_in_tensorrt("11.4.0"), builder, precision, 1.0, b"")
    expected_ten = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"]}[precision]
    assert ten.set_flags == expected_ten and eleven.set_flags == []
    assert ten.cleared_flags == eleven.cleared_flags == (["TF32"] if precision == "fp32" else [])


def test_onnx_dtype_for_each_tensorrt_version() -> None:
    """The export an engine is built from: float32 on TensorRT 10; the engine's dtype on 11, bf16
    refused."""
    ten, eleven = stand_in_tensorrt("10.13.0"), stand_in_tensorrt("11.4.0")
    assert not strongly_typed(ten) and strongly_typed(eleven)
    assert [onnx_dtype_for(p, ten) for p in ("fp32", "fp16", "bf16")] == ["float32"] * 3
    assert [onnx_dtype_for(p, eleven) for p in ("fp32", "fp16")] == ["float32", "float16"]
    with pytest.raises(PromptSegError, match="bf16 engines need TensorRT 10") as caught:
        onnx_dtype_for("bf16", eleven)
    assert "\n" not in str(caught.value)


def test_tensorrt_11_refuses_a_graph_of_another_dtype(
    fake_onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On TensorRT 11 an fp16 build from the float32 export is refused in one line naming the graph,
    before any builder call, and bf16 is refused outright; nothing is written."""
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("11.4.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        InputError, match="prompt_encoder.onnx: is a float32 graph.*fp16 engine needs a float16"
    ) as caught:
        build_engines(fake_onnx_dir, fake_onnx_dir / "out", precision="fp16")
    assert "\n" not in str(caught.value)
    with pytest.raises(PromptSegError, match="bf16 engines need TensorRT 10"):
        build_engines(fake_onnx_dir, fake_onnx_dir / "out", precision="bf16")
    assert not (fake_onnx_dir / "out").exists()


# --- TensorRT on a CUDA GPU ------------------------------------------------------------------


def disk_inputs(
    shots: int, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt images (1, K, 3, 32, 32), masks (1, K, 32, 32), types (1, K) and queries (B, 3, 32,
    32) of noisy disks."""
    rng = np.random.default_rng(seed)
    pairs = [disk_example(rng, (TINY_CONFIG.resolution,) * 2) for _ in range(shots + batch)]
    images = (
        torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None].repeat(
            1, 3, 1, 1
        )
        / 255
    )
    masks = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)
    return (
        images[:shots][None],
        masks[:shots][None],
        torch.ones(1, shots, dtype=torch.long),
        images[shots:],
    )


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:  # noqa: F811
    """ONNX of the tiny model, then fp32 and fp16 engines sharing one timing cache (built once).

    Each engine is built from an export in onnx_dtype_for(precision): float32 for both on TensorRT
    10, a float16 export for the fp16 engine on TensorRT 11 (root/onnx-float16)."""
    if _SKIP_REASON:
        pytest.skip(_SKIP_REASON)
    from promptseg.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("tensorrt")
    model = load_model(tiny_checkpoint).eval()
    export_onnx(model, root / "onnx")
    cache = root / "timing.cache"
    result: dict[str, object] = {"model": model, "root": root, "cache": cache}
    for precision in ("fp32", "fp16"):
        dtype = onnx_dtype_for(precision, _TRT)
        onnx_dir = root / "onnx" if dtype == "float32" else root / f"onnx-{dtype}"
        if not onnx_dir.exists():
            export_onnx(model, onnx_dir, dtype=getattr(torch, dtype))
        started = time.perf_counter()
        build_engines(
            onnx_dir,
            root / precision,
            max_batch=MAX_BATCH,
            max_prompts=MAX_PROMPTS,
            opt_batch=5,
            precision=precision,
            timing_cache=cache,
        )
        result[f"{precision}_seconds"] = time.perf_counter() - started
        result[f"{precision}_cache_bytes"] = cache.stat().st_size
    return result


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shots", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 5])
def test_engines_match_the_eager_model(
    engines: dict, precision: str, shots: int, batch: int
) -> None:
    model = engines["model"]
    backend = TensorRTBackend(model, torch.device("cuda"), engine_dir=engines["root"] / precision)
    images, maps, types, queries = disk_inputs(shots, batch, seed=10 * shots + batch)
    with torch.no_grad():
        expected = model.decode(queries, model.encode_prompts(images, maps, types))
    state = backend.encode(images, maps, types)
    assert isinstance(state, FlatPromptState) and all(t.is_cuda for t in state.tensors)
    logits = backend.decode(queries, state)
    assert (
        logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.shape == expected.shape
    )
    error = float((logits - expected).abs().max())
    if precision == "fp32":
        assert error <= FP32_TOLERANCE, error
    else:
        assert error <= FP16_TOLERANCE, error
        assert dice(logits > 0, expected > 0) >= FP16_MIN_DICE


@needs_tensorrt
def test_engine_io_types_follow_the_tensorrt_version(engines: dict) -> None:
    """The runner reads the engines' I/O types from TensorRT: float32 inputs and logits on TensorRT
    10 (flags lower only inner layers); on 11 the fp16 engine keeps the float16 graph's types, and
    the backend still returns float32 logits."""
    backend = TensorRTBackend(
        engines["model"], torch.device("cuda"), engine_dir=engines["root"] / "fp16"
    )
    expected = getattr(torch, onnx_dtype_for("fp16", _TRT))
    assert backend.encoder.dtypes[PROMPT_INPUT_NAMES[0]] == expected
    assert backend.decoder.dtypes[QUERY_INPUT_NAME] == expected
    images, maps, types, queries = disk_inputs(2, 3, seed=4)
    state = backend.encode(images, maps, types)
    assert all(t.dtype == expected for t in state.tensors)
    assert backend.decode(queries, state).dtype == torch.float32


@needs_tensorrt
def test_timing_cache_is_written_and_reused(engines: dict) -> None:
    first = read_sidecar(engines["root"] / "fp32")
    second = read_sidecar(engines["root"] / "fp16")
    assert first["timing_cache_bytes_loaded"] == 0 and engines["fp32_cache_bytes"] > 0
    assert second["timing_cache_bytes_loaded"] == engines["fp32_cache_bytes"]
    assert engines["fp16_cache_bytes"] >= engines["fp32_cache_bytes"]
    started = time.perf_counter()
    build_engines(
        engines["root"] / "onnx",
        engines["root"] / "fp32-again",
        max_batch=MAX_BATCH,
        max_prompts=MAX_PROMPTS,
        opt_batch=5,
        precision="fp32",
        timing_cache=engines["cache"],
    )
    rebuild = time.perf_counter() - started
    print(
        f"fp32 build {engines['fp32_seconds']:.1f} s, fp16 {engines['fp16_seconds']:.1f} s, "
        f"fp32 rebuild with the cache {rebuild:.1f} s"
    )
    assert (
        read_sidecar(engines["root"] / "fp32-again")["timing_cache_bytes_loaded"]
        == engines["fp16_cache_bytes"]
    )


@needs_tensorrt
def test_sidecar_describes_the_engines(engines: dict) -> None:
    from promptseg.model.weights import weights_sha256

    sidecar = read_sidecar(engines["root"] / "fp16")
    config = engines["model"].config
    assert sidecar["precision"] == "fp16" and sidecar["tensorrt_version"] == _TRT.__version__
    assert (sidecar["resolution"], sidecar["in_channels"]) == (
        config.resolution,
        config.in_channels,
    )
    assert ModelConfig.from_dict(sidecar["config"]) == config
    assert sidecar["weights_sha256"] == weights_sha256(engines["model"])
    assert sidecar["onnx_dtype"] == onnx_dtype_for(
        "fp16", _TRT
    )  # float16 on TensorRT 11, float32 on 10
    shapes = profile_shapes(config, (1, 5, MAX_BATCH), (1, 4, MAX_PROMPTS))
    assert set(sidecar["profiles"]["prompt_encoder"]) == set(PROMPT_INPUT_NAMES)
    assert set(sidecar["profiles"]["query_decoder"]) == {QUERY_INPUT_NAME, *encoding_names(config)}
    for entries in sidecar["profiles"].values():
        for name, levels in entries.items():
            assert [tuple(levels[k]) for k in ("min", "opt", "max")] == list(shapes[name]), name
    with pytest.raises(InputError, match="built for fp16, not fp32"):
        TensorRTBackend(
            engines["model"],
            torch.device("cuda"),
            engine_dir=engines["root"] / "fp16",
            precision="fp32",
        )


@needs_tensorrt
def test_batches_beyond_the_profile_are_refused(engines: dict) -> None:
    backend = TensorRTBackend(
        engines["model"], torch.device("cuda"), engine_dir=engines["root"] / "fp32"
    )
    assert (backend.max_batch, backend.max_prompts) == (MAX_BATCH, MAX_PROMPTS)
    images, maps, types, queries = disk_inputs(2, MAX_BATCH + 1, seed=0)
    state = backend.encode(images, maps, types)
    with pytest.raises(ValueError, match=f"exceeds the TensorRT engine's max_batch of {MAX_BATCH}"):
        backend.decode(queries, state)
    images, maps, types, _ = disk_inputs(MAX_PROMPTS + 1, 1, seed=0)
    with pytest.raises(
        ValueError, match=f"exceed the TensorRT engine's max_prompts of {MAX_PROMPTS}"
    ):
        backend.encode(images, maps, types)


@needs_tensorrt
def test_backend_builds_its_own_engines(engines: dict) -> None:
    """Without engine_dir the backend exports and builds once, in a temporary folder."""
    model = engines["model"]
    backend = TensorRTBackend(
        model,
        torch.device("cuda"),
        precision="fp32",
        max_batch=2,
        max_prompts=2,
        timing_cache=engines["cache"],
    )
    images, maps, types, queries = disk_inputs(2, 2, seed=3)
    with torch.no_grad():
        expected = model.decode(queries, model.encode_prompts(images, maps, types))
    logits = backend.decode(queries, backend.encode(images, maps, types))
    assert float((logits - expected).abs().max()) <= FP32_TOLERANCE


@needs_tensorrt
def test_segmenter_runs_on_the_engines(engines: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Segmenter (prompt cache, chunks of max_batch, resizing) on the fp32 engines agrees with
    the torch backend on the GPU (cuDNN's TF32 off, so both are float32 throughout)."""
    from promptseg.engine import Segmenter

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    rng = np.random.default_rng(5)
    images, masks = zip(*(disk_example(rng, (40, 40)) for _ in range(3)))
    queries = np.stack([disk_example(rng, (40, 40))[0] for _ in range(11)])
    results = {}
    for backend, options in (("torch", {}), ("tensorrt", {"engine_dir": engines["root"] / "fp32"})):
        model = copy.deepcopy(engines["model"])  # the torch backend moves its model to the GPU
        segmenter = Segmenter(
            model, device="cuda", backend=backend, backend_options=options, max_batch=MAX_BATCH
        )
        results[backend] = segmenter.segment(
            queries, segmenter.encode_prompts(list(images), list(masks))
        )
    assert np.abs(results["tensorrt"] - results["torch"]).max() <= FP32_TOLERANCE
