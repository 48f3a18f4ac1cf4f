"""TensorRT 10 and 11 engines built from the two exported ONNX graphs (see promptseg.export.graphs).

    build_engines(onnx_dir, out_dir) -> out_dir/prompt_encoder.plan, out_dir/query_decoder.plan,
                                        out_dir/promptseg_tensorrt.json (the sidecar)

Each engine has one optimisation profile. The prompt encoder's inputs are dynamic in the prompt
count K; the query decoder's in the query batch B and, through its encoding inputs
(1, H_i, K * n_i, D), in K as well, where n_i prompt tokens come from one prompt at attention
stage i (graphs.tokens_per_prompt; with a prompt bottleneck every stage has bottleneck_tokens
tokens whatever K is).

Precision: TensorRT 10 lowers an fp32 graph to fp16 / bf16 by builder flags. TensorRT 11 removed
those flags and builds every network strongly typed, its types taken from the graph, so there an
fp16 engine is built from an fp16 ONNX export (`onnx_dtype_for`) and bf16 is refused (the ONNX
export has no bfloat16). Other major versions are refused in one line (`tensorrt_module`).

Plans are tied to the GPU model and the TensorRT version that built them; the sidecar records
both with the model config, so a loader can refuse a mismatch with a clear message.
`tensorrt` is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from promptseg.engine.backends.tensorrt_runtime import (
    PRECISIONS,
    SIDECAR_FORMAT,
    SIDECAR_NAME,
    SIDECAR_VERSION,
    _one_line,
    gpu_description,
    plan_path,
    require_tensorrt_gpu,
    strongly_typed,
    tensorrt_logger,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.export.graphs import (
    GRAPH_ROLES,
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    encoding_names,
    encoding_stages,
    graph_paths,
    stage_widths,
    tokens_per_prompt,
)
from promptseg.files import atomic_write, refuse_existing
from promptseg.model import ModelConfig

ONNX_CONFIG_KEY = "model_config"
ONNX_SHARED_KEYS = ("model_config", "weights_sha256", "dtype")
DEFAULT_OPT_PROMPTS = 4


Shape = tuple[int, ...]


class ShapeRange(NamedTuple):
    """The min / opt / max shapes of one input in an optimisation profile."""

    min: Shape
    opt: Shape
    max: Shape


class SizeRange(NamedTuple):
    """min <= opt <= max of one dynamic size (the batch B or the prompt count K)."""

    min: int
    opt: int
    max: int


# --- profile shapes (pure; no tensorrt needed) ------------------------------------------------


def encoding_tokens(config: ModelConfig, stage_index: int, prompts: int) -> int:
    """Prompt tokens at attention stage config.attention_stages[stage_index] for K = `prompts`:
    K * n_i (graphs.tokens_per_prompt), or bottleneck_tokens for a model with a prompt
    bottleneck."""
    per_prompt = tokens_per_prompt(config)[stage_index]
    return config.bottleneck_tokens if per_prompt is None else prompts * per_prompt


def encoding_shape(config: ModelConfig, stage_index: int, prompts: int) -> Shape:
    """(1, H, T, D) of every keys/values tensor of stage `stage_index`: H heads of head_dim D."""
    width = stage_widths(config)[stage_index]
    return (
        1,
        width // config.head_dim,
        encoding_tokens(config, stage_index, prompts),
        config.head_dim,
    )


def encoder_input_shapes(config: ModelConfig, prompts: int) -> dict[str, Shape]:
    """Prompt-encoder inputs for K = `prompts`: images (1, K, C, R, R), maps (1, K, R, R), types (1,
    K)."""
    r, c = config.resolution, config.in_channels
    images, maps, types = PROMPT_INPUT_NAMES
    return {images: (1, prompts, c, r, r), maps: (1, prompts, r, r), types: (1, prompts)}


def decoder_input_shapes(config: ModelConfig, batch: int, prompts: int) -> dict[str, Shape]:
    """Query-decoder inputs: queries (B, C, R, R) and each encoding tensor (1, H, T, D) for K =
    `prompts`."""
    r, c = config.resolution, config.in_channels
    shapes: dict[str, Shape] = {QUERY_INPUT_NAME: (batch, c, r, r)}
    for name, stage in zip(encoding_names(config), encoding_stages(config)):
        shapes[name] = encoding_shape(config, stage, prompts)
    return shapes


def profile_shapes(
    config: ModelConfig, batch: Sequence[int], prompts: Sequence[int]
) -> dict[str, ShapeRange]:
    """min/opt/max shapes of every input of both graphs, by input name.

    batch and prompts are (min, opt, max) query batch sizes B and prompt counts K.
    """
    batch, prompts = SizeRange(*batch), SizeRange(*prompts)
    per_level = [
        {**encoder_input_shapes(config, k), **decoder_input_shapes(config, b, k)}
        for b, k in zip(batch, prompts)
    ]
    return {name: ShapeRange(*(level[name] for level in per_level)) for name in per_level[0]}


def size_range(name: str, maximum: int, optimum: int | None, default_opt: int) -> SizeRange:
    """SizeRange(1, opt, max) for the argument `name`; InputError when not 1 <= opt <= max."""
    opt = min(default_opt, maximum) if optimum is None else optimum
    if maximum < 1:
        raise InputError(f"max_{name}", f"must be at least 1, got {maximum}")
    if not 1 <= opt <= maximum:
        raise InputError(f"opt_{name}", f"must lie in 1..{maximum} (max_{name}), got {opt}")
    return SizeRange(1, opt, maximum)


# --- tensorrt -------------------------------------------------------------------------------


def onnx_dtype_for(precision: str, trt: ModuleType) -> str:
    """The float dtype ("float32" or "float16") of the ONNX export that a `precision` engine is
    built from.

    TensorRT 10 lowers a float32 graph itself (builder flags). TensorRT 11 keeps the graph's types,
    so fp16 needs a float16 export; bf16 raises PromptSegError (one line): export_onnx has no
    bfloat16.
    """
    if precision not in PRECISIONS:
        raise InputError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not strongly_typed(trt) or precision == "fp32":
        return "float32"
    if precision == "bf16":
        raise PromptSegError(
            f"bf16 engines need TensorRT 10: TensorRT {trt.__version__} builds strongly typed "
            "networks only, "
            "and the ONNX export has no bfloat16; use precision fp16 or fp32"
        )
    return "float16"


def _parser_error(error: Any) -> str:
    """One IParserError as 'description (node N name: Operator)'."""
    where = " ".join(
        part for part in (str(error.node_name() or ""), str(error.node_operator() or "")) if part
    )
    return f"{_one_line(error.desc())} (node {error.node()}{': ' + where if where else ''})"


def _parse_onnx(trt: ModuleType, builder: Any, path: Path) -> tuple[Any, Any]:
    """ONNX file -> (INetworkDefinition, the OnnxParser that owns its weights until the build).

    InputError naming the file, with every parser error on one line, when the graph does not parse.
    """
    network = builder.create_network(
        0
    )  # always explicit-batch; TensorRT 11 makes every network strongly typed
    parser = trt.OnnxParser(network, tensorrt_logger())
    if not parser.parse_from_file(str(path)):
        details = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(path, f"TensorRT's ONNX parser failed: {details or 'no details given'}")
    return network, parser


def _network_inputs(network: Any) -> dict[str, Shape]:
    """name -> shape (-1 for dynamic dimensions) of every network input."""
    return {
        network.get_input(i).name: tuple(network.get_input(i).shape)
        for i in range(network.num_inputs)
    }


def _network_profile(
    path: Path, inputs: dict[str, Shape], shapes: dict[str, ShapeRange]
) -> dict[str, ShapeRange]:
    """The profile entries of a network's inputs, checked against the ONNX graph's static
    dimensions."""
    profile = {}
    for name, declared in inputs.items():
        if name not in shapes:
            raise InputError(
                path, f"unexpected graph input {name!r}; expected some of {', '.join(shapes)}"
            )
        for level in shapes[name]:
            if len(level) != len(declared) or any(
                d not in (-1, w) for d, w in zip(declared, level)
            ):
                raise InputError(
                    path,
                    f"input {name!r} has shape {declared} but the model config implies {level}",
                )
        profile[name] = shapes[name]
    return profile


def _builder_config(
    trt: ModuleType, builder: Any, precision: str, workspace_gib: float, cache: bytes
) -> Any:
    """IBuilderConfig with the precision flags, the workspace limit and a timing cache loaded from
    `cache`.

    TensorRT 10: fp16 / bf16 set the FP16 / BF16 flag. TensorRT 11 has no such flags (the graph's
    types decide; build_engines checks them). fp32 also turns TF32 off, so an fp32 engine matches
    the eager float32 model closely.
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp32":
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)
    elif not strongly_typed(trt):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    timing_cache = config.create_timing_cache(cache)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        raise PromptSegError(
            "TensorRT rejected the timing cache (built by another TensorRT version or GPU?)"
        )
    return config


def _build_plan(
    trt: ModuleType,
    path: Path,
    shapes: dict[str, ShapeRange],
    precision: str,
    workspace_gib: float,
    cache: bytes,
) -> tuple[bytes, bytes, dict[str, ShapeRange]]:
    """One ONNX graph -> (serialized engine, updated timing cache, the profile used)."""
    builder = trt.Builder(tensorrt_logger())
    network, parser = _parse_onnx(trt, builder, path)
    declared = _network_inputs(network)
    profile_entries = _network_profile(path, declared, shapes)
    config = _builder_config(trt, builder, precision, workspace_gib, cache)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_entries.items():
        if -1 in declared[name]:
            profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    tensorrt_logger().last_errors = []
    serialized = builder.build_serialized_network(network, config)
    del parser  # kept alive until here: the network refers to weights the parser owns
    if serialized is None:
        reason = (
            "; ".join(_one_line(m) for m in tensorrt_logger().last_errors) or "no error message"
        )
        raise PromptSegError(f"{path}: TensorRT could not build an engine: {reason}")
    return (
        bytes(memoryview(serialized)),
        bytes(memoryview(config.get_timing_cache().serialize())),
        profile_entries,
    )


# --- files ------------------------------------------------------------------------------------


def bytes_writer(data: bytes) -> Callable[[str], None]:
    """A writer for promptseg.files.atomic_write that stores `data` in the temporary file it is
    given."""

    def write(temporary: str) -> None:
        Path(temporary).write_bytes(data)

    return write


def read_graph_metadata(sources: dict[str, Path]) -> tuple[ModelConfig, dict[str, str]]:
    """(model config, metadata) that export_onnx wrote into both graphs (needs the onnx package).

    InputError naming the file when a graph holds another role, or the two graphs come from
    different model configurations or weights.
    """
    try:
        from promptseg.export.onnx_export import read_onnx_metadata
    except ImportError as exc:
        raise PromptSegError(
            f"reading the ONNX graphs' metadata needs the onnx package: {exc}"
        ) from None
    found = {}
    for role, path in sources.items():
        found[role] = read_onnx_metadata(path)
        if found[role]["graph_role"] != role:
            raise InputError(
                path, f"holds the {found[role]['graph_role']} graph, expected the {role}"
            )
    encoder, decoder = found["prompt_encoder"], found["query_decoder"]
    for key in ONNX_SHARED_KEYS:
        if encoder[key] != decoder[key]:
            raise InputError(
                sources["query_decoder"], f"differs from the prompt encoder's export in {key}"
            )
    return ModelConfig.from_json(encoder[ONNX_CONFIG_KEY]), encoder


def check_graphs_unchanged(sources: dict[str, Path]) -> None:
    """InputError naming a graph whose tensors no longer hash to the digest recorded at export (the
    file was changed since; onnx_export.check_graph_tensors), checked before TensorRT parses it."""
    from promptseg.export.onnx_export import check_graph_tensors, read_onnx_metadata

    for path in sources.values():
        check_graph_tensors(path, read_onnx_metadata(path))


def _sidecar(
    config: ModelConfig,
    metadata: dict[str, str],
    precision: str,
    version: str,
    profiles: dict[str, dict[str, ShapeRange]],
    batch: SizeRange,
    prompts: SizeRange,
    cache_loaded: int,
) -> dict[str, Any]:
    """Everything a loader checks before using the plans (JSON-ready)."""
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "tensorrt_version": version,
        **gpu_description(),
        "precision": precision,
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "config": json.loads(config.to_json()),
        "weights_sha256": metadata["weights_sha256"],
        "onnx_dtype": metadata["dtype"],
        "batch": batch._asdict(),
        "prompts": prompts._asdict(),
        "profiles": {
            role: {
                name: {k: list(v) for k, v in shape._asdict().items()}
                for name, shape in entries.items()
            }
            for role, entries in profiles.items()
        },
        "engines": {role: plan_path("", role).name for role in GRAPH_ROLES},
        "outputs": {"prompt_encoder": encoding_names(config), "query_decoder": [LOGITS_NAME]},
        "timing_cache_bytes_loaded": cache_loaded,
    }


def build_engines(
    onnx_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_batch: int = 16,
    max_prompts: int = 16,
    opt_batch: int | None = None,
    opt_prompts: int | None = None,
    precision: str = "fp16",
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Build prompt_encoder.plan and query_decoder.plan from onnx_dir's two graphs into out_dir.

    Profiles: K in 1..max_prompts (optimised for opt_prompts, default min(4, max_prompts)) and
    B in 1..max_batch (optimised for opt_batch, default max_batch: the Segmenter sends full
    chunks of max_batch queries, which must therefore be <= the engine's max_batch).
    precision: "fp32" (TF32 off), "fp16" or "bf16". TensorRT 10 may run layers in that type, inputs
    and outputs stay float32; TensorRT 11 needs graphs exported in onnx_dtype_for(precision) (fp16:
    float16 graphs, whose inputs and outputs are float16 too; bf16 is refused) and raises InputError
    naming the graph otherwise. timing_cache: a file read when present and rewritten after the
    builds, which makes rebuilds on the same GPU and TensorRT version much faster.
    The model config and weights digest come from the graphs' metadata (needs the onnx package).
    Returns {"prompt_encoder": plan, "query_decoder": plan, "sidecar": json[, "timing_cache":
    file]}.
    """
    if precision not in PRECISIONS:
        raise InputError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    sources = graph_paths(onnx_dir)
    for path in sources.values():
        if not path.is_file():
            raise InputError(
                path, "ONNX graph not found; export it first (promptseg export --format onnx)"
            )
    config, metadata = read_graph_metadata(sources)
    batch = size_range("batch", max_batch, opt_batch, max_batch)
    prompts = size_range("prompts", max_prompts, opt_prompts, DEFAULT_OPT_PROMPTS)
    if prompts.max > config.max_prompts:
        raise InputError(
            "max_prompts",
            f"{prompts.max} exceeds the model's limit of {config.max_prompts} prompts",
        )
    out = Path(out_dir)
    written = {role: plan_path(out, role) for role in GRAPH_ROLES} | {"sidecar": out / SIDECAR_NAME}
    refuse_existing(list(written.values()), overwrite)
    trt = require_tensorrt_gpu()
    check_onnx_dtype(trt, precision, metadata.get("dtype"), sources["prompt_encoder"])
    check_graphs_unchanged(sources)

    cache_path = None if timing_cache is None else Path(timing_cache)
    cache = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache_loaded = len(cache)
    shapes = profile_shapes(config, batch, prompts)
    plans, profiles = {}, {}
    for role, source in sources.items():
        plans[role], cache, profiles[role] = _build_plan(
            trt, source, shapes, precision, workspace_gib, cache
        )
    for role, plan in plans.items():
        atomic_write(written[role], bytes_writer(plan), overwrite)
    sidecar = _sidecar(
        config, metadata, precision, trt.__version__, profiles, batch, prompts, cache_loaded
    )
    sidecar_text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    atomic_write(written["sidecar"], bytes_writer(sidecar_text.encode()), overwrite)
    if cache_path is not None:
        atomic_write(
            cache_path, bytes_writer(cache), overwrite=True
        )  # rewritten after every build by design
        written["timing_cache"] = cache_path
    return written


def check_onnx_dtype(trt: ModuleType, precision: str, found: str | None, path: Path) -> None:
    """InputError naming the graph when a strongly typed TensorRT (11) cannot build a `precision`
    engine from graphs of dtype `found`; PromptSegError for bf16 there. TensorRT 10 takes any
    export."""
    expected = onnx_dtype_for(precision, trt)
    if strongly_typed(trt) and found != expected:
        raise InputError(
            path,
            f"is a {found} graph, but TensorRT {trt.__version__} builds strongly typed engines "
            "whose "
            f"precision comes from the graph: a {precision} engine needs a {expected} ONNX export",
        )


__all__: list[str] = [
    "ShapeRange",
    "SizeRange",
    "build_engines",
    "check_graphs_unchanged",
    "check_onnx_dtype",
    "decoder_input_shapes",
    "encoder_input_shapes",
    "encoding_shape",
    "encoding_tokens",
    "onnx_dtype_for",
    "profile_shapes",
    "read_graph_metadata",
]
