"""ONNX export of PromptSegNet as two self-contained graphs (see graphs.py for their contract).

    export_onnx(model, DIR) -> {"prompt_encoder": DIR/prompt_encoder.onnx, "query_decoder":
    DIR/query_decoder.onnx}

    prompt_encoder.onnx  prompt_images (1, K, C, R, R), prompt_maps (1, K, R, R), prompt_types (1,
    K) int64
                         -> keys_s{i}_{e}, values_s{i}_{e}: (1, H, K * n_i, D)
    query_decoder.onnx   queries (B, C, R, R) + those tensors -> logits (B, R, R)

K (axis name "prompts"), B ("batch") and the decoder's token axes ("tokens_s{i}") are dynamic, so
one pair of files serves every prompt count and batch size. Each file carries the promptseg
version, resolution, channels, model config, a weights digest, dtype, its graph role and the
encoding names in its metadata_props, which runtimes check against the model they expect
(`read_onnx_metadata`, `check_graph_metadata`).

How: torch.onnx.export's dynamo exporter (torch.export, then onnxscript's translation and
optimiser) on a CPU copy of the model whose attention runs the "sdpa" backend. SDPA lowers to
MatMul + Softmax (opset 20), whereas the "reference" backend adds IsInf/IsNaN/ReduceMax/Where
nodes per attention for its empty-key-set guard, which a full prompt set never needs; the Triton
kernels cannot be exported at all. The caller's model is not modified.

Opset 20 (DEFAULT_OPSET): torch 2.13's default, translated without the ONNX version converter
(which torch runs below opset 18), with GELU as one Gelu node; ONNX Runtime runs it from 1.17 on
and it lies within the opsets TensorRT 10's ONNX parser reads. Opset 23 also exports and runs in
ONNX Runtime 1.32 (fused Attention and GroupNormalization nodes), but only the newest runtimes
read it, so it is opt-in (opset=23).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
from torch.export import Dim

import promptseg
from promptseg.errors import InputError
from promptseg.export.graphs import (
    GRAPH_ROLES,
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    PromptEncoderGraph,
    QueryDecoderGraph,
    config_differences,
    encoding_names,
    encoding_stages,
    example_inputs,
    graph_paths,
    stage_widths,
)
from promptseg.files import refuse_existing
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import weights_sha256

DEFAULT_OPSET = 20
EXPORT_DTYPES = (torch.float32, torch.float16)
GRAPH_TENSORS_KEY = "graph_tensors_sha256"
REQUIRED_METADATA = (
    "promptseg_version",
    "graph_role",
    "resolution",
    "in_channels",
    "model_config",
    "weights_sha256",
    "dtype",
    "encoding_names",
)
_PROTOBUF_LIMIT = 2**31 - 1  # bytes; a larger model would need external data files


def export_onnx(
    model: PromptSegNet,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write out_dir/prompt_encoder.onnx and out_dir/query_decoder.onnx; returns {role: path}.

    Float tensors of both graphs are `dtype` (float32 or float16); prompt_types stays int64. The
    files are written in a temporary folder beside out_dir, checked with onnx.checker and moved
    into place, so a failed export never leaves a partial file. Existing files raise InputError
    unless overwrite=True.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"ONNX export supports float32 and float16, not {dtype}")
    targets = graph_paths(out_dir)
    refuse_existing(list(targets.values()), overwrite)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    protos = export_protos(model, opset, dtype)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export-") as staging:
        staged = {
            role: save_checked(protos[role], Path(staging) / path.name)
            for role, path in targets.items()
        }
        out.mkdir(exist_ok=True)
        for role, path in targets.items():
            os.replace(staged[role], path)
    return targets


def export_protos(
    model: PromptSegNet, opset: int, dtype: torch.dtype
) -> dict[str, onnx.ModelProto]:
    """Both graphs as in-memory ModelProtos with metadata, traced on a CPU copy of `model`."""
    config = model.config
    traced = copy.deepcopy(model).to("cpu", dtype).eval().set_attention_kernel("sdpa")
    (images, maps, types), queries = example_inputs(config)
    prompts = (images.to(dtype), maps.to(dtype), types)
    with torch.no_grad():
        encoding = PromptEncoderGraph(traced)(*prompts)
    names = encoding_names(config)
    shots = Dim("prompts", min=1, max=config.max_prompts)
    tokens = [Dim(f"tokens_s{stage}", min=1) for stage in range(len(stage_widths(config)))]
    token_axes = tuple({2: tokens[stage]} for stage in encoding_stages(config))
    encoder = trace(
        PromptEncoderGraph(traced).eval(),
        prompts,
        list(PROMPT_INPUT_NAMES),
        names,
        dynamic_shapes={name: {1: shots} for name in PROMPT_INPUT_NAMES},
        opset=opset,
    )
    decoder = trace(
        QueryDecoderGraph(traced).eval(),
        (queries.to(dtype), *encoding),
        [QUERY_INPUT_NAME, *names],
        [LOGITS_NAME],
        dynamic_shapes=({0: Dim("batch", min=1)}, token_axes),
        opset=opset,
    )
    require_dynamic(encoder, {name: 1 for name in PROMPT_INPUT_NAMES})
    require_dynamic(decoder, {QUERY_INPUT_NAME: 0, **{name: 2 for name in names}})
    protos = dict(zip(GRAPH_ROLES, (encoder, decoder)))
    digest = weights_sha256(model)
    for role, proto in protos.items():
        props = graph_metadata(model, role, dtype, digest)
        props[GRAPH_TENSORS_KEY] = graph_tensors_sha256(proto)
        onnx.helper.set_model_props(proto, props)
    return protos


def graph_tensors_sha256(proto: onnx.ModelProto) -> str:
    """SHA-256 over the tensors a graph computes with: its initializers and Constant nodes (names,
    dtypes, shapes and bytes, in name order). Written into the metadata at export, recomputed when
    a runtime loads the file (`check_graph_tensors`), so a file whose weights were changed after
    export is refused even when its metadata (weights_sha256 included) was copied from a genuine
    one."""
    tensors = [(t.name, t) for t in proto.graph.initializer]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            tensors += [
                (f"{node.output[0]}:{a.name}", a.t)
                for a in node.attribute
                if a.type == onnx.AttributeProto.TENSOR
            ]
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        array = onnx.numpy_helper.to_array(tensor)
        digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_graph_tensors(path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """InputError naming `path` unless the tensors of the graph in it hash to the metadata's
    graph_tensors_sha256 (missing in exports of older versions: export again)."""
    recorded = metadata.get(GRAPH_TENSORS_KEY)
    if recorded is None:
        raise InputError(
            path, f"its metadata records no {GRAPH_TENSORS_KEY} (an older export); export it again"
        )
    if graph_tensors_sha256(onnx.load_model(path)) != recorded:
        raise InputError(
            path,
            "its weights do not match the digest recorded at export (the file was changed); export "
            "it again",
        )


def graph_metadata(
    model: PromptSegNet, role: str, dtype: torch.dtype, weights_digest: str | None = None
) -> dict[str, str]:
    """The metadata_props written into the `role` graph of `model` (all values are strings).

    weights_digest: weights_sha256(model) when the caller has it already (computed here otherwise).
    """
    config = model.config
    return {
        "promptseg_version": promptseg_version(),
        "graph_role": role,
        "resolution": str(config.resolution),
        "in_channels": str(config.in_channels),
        "model_config": config.to_json(),
        "weights_sha256": weights_digest or weights_sha256(model),
        "dtype": str(dtype).removeprefix("torch."),
        "encoding_names": json.dumps(encoding_names(config)),
    }


def check_graph_metadata(
    metadata: Mapping[str, str],
    path: str | os.PathLike,
    role: str,
    config: ModelConfig,
    weights_digest: str,
) -> None:
    """InputError naming `path` unless its metadata describes the `role` graph of the model with
    `config` and weights_sha256 `weights_digest`."""
    if metadata.get("graph_role") != role:
        raise InputError(path, f"holds the {metadata.get('graph_role')} graph, expected the {role}")
    for key, expected in (("resolution", config.resolution), ("in_channels", config.in_channels)):
        if metadata.get(key) != str(expected):
            raise InputError(
                path,
                f"was exported for {key} {metadata.get(key)}, but the model has {key} {expected}",
            )
    try:
        exported, current = json.loads(metadata["model_config"]), json.loads(config.to_json())
    except (KeyError, ValueError):
        raise InputError(path, "has no readable model_config in its metadata") from None
    differing = config_differences(exported, current)
    if differing:
        raise InputError(
            path,
            f"was exported for another model configuration (differs in {', '.join(differing)})",
        )
    if metadata.get("weights_sha256") != weights_digest:
        raise InputError(path, "was exported from other weights than this model's; export it again")


def stage_of(name: str) -> int:
    """Attention-stage index parsed from an encoding tensor name ("keys_s1_b0" -> 1); the exporter
    itself uses graphs.encoding_stages, this reads a name back (tests check axis names with it)."""
    return int(name.split("_")[1][1:])


def trace(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Mapping | Sequence,
    opset: int,
) -> onnx.ModelProto:
    """One graph through the dynamo exporter, weights embedded, stack traces dropped. The exporter's
    registry logs one "torchvision is not installed" warning per torchvision operator it skips;
    PromptSeg uses none, so those records are dropped while exporting, as are torch's notes for its
    own developers."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # notes for torch's own developers, not for users
            warnings.filterwarnings(
                "ignore", message=".*axis name.*shares the same shape constraints"
            )  # keys/values
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
            )
            program = torch.onnx.export(
                module,
                args,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = program.model_proto
        for node in proto.graph.node:  # the traces name source files of the exporting machine
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        return proto
    finally:
        registry.setLevel(level)


def require_dynamic(proto: onnx.ModelProto, axes: Mapping[str, int]) -> None:
    """RuntimeError when the exporter fixed an axis that must stay dynamic (input name -> axis).

    torch.onnx.export falls back to strategies that specialise shapes when torch.export fails,
    so a silently fixed K or B is caught here instead of at the first other-sized input.
    """
    for value in proto.graph.input:
        if value.name in axes:
            dim = value.type.tensor_type.shape.dim[axes[value.name]]
            if not dim.dim_param:
                raise RuntimeError(
                    f"ONNX export fixed axis {axes[value.name]} of {value.name} to "
                    f"{dim.dim_value}; it must stay dynamic"
                )


def save_checked(proto: onnx.ModelProto, path: Path) -> Path:
    """Save `proto` as one self-contained file (weights inside) and run onnx.checker on it."""
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise RuntimeError(
            f"{path.name}: the graph exceeds protobuf's 2 GiB limit and cannot be self-contained"
        )
    onnx.save_model(proto, path, save_as_external_data=False)
    onnx.checker.check_model(path, full_check=True)
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """metadata_props of a promptseg ONNX file as {key: value} (strings; model_config is JSON).

    InputError (one line, naming the file) when it is missing, not ONNX, or lacks promptseg
    metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found; create it with `promptseg export --format onnx`")
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001  # protobuf's DecodeError and friends
        raise InputError(path, f"not a readable ONNX file ({type(exc).__name__})") from None
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise InputError(path, f"not a promptseg ONNX export (metadata lacks {', '.join(missing)})")
    return metadata


def promptseg_version() -> str:
    """The promptseg version written into the graphs' metadata."""
    return promptseg.__version__
