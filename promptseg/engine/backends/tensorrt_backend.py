"""`tensorrt` backend: the two exported graphs as TensorRT 10 or 11 engines on a CUDA GPU.

    encode(images (1, K, C, R, R), maps (1, K, R, R), types (1, K)) -> FlatPromptState of CUDA
    tensors
        keys_s{i}_{e}, values_s{i}_{e}: (1, H, K * n_i, D), in encoding_names order
    decode(queries (B, C, R, R), state) -> (B, R, R) float32 CPU logits

Engines come from `engine_dir` (promptseg export --format tensorrt; the sidecar is checked against
the model's config and weights, the TensorRT version and the GPU), or are built once, at
construction, from the model's ONNX export in a temporary folder. Each engine has one optimisation
profile: K must not exceed its max_prompts and B its max_batch (ValueError otherwise); a Segmenter
lowers its own max_batch to backend.max_batch. Buffers are PyTorch CUDA tensors (no pycuda); each
engine runs on a private CUDA stream made current for the call, ordered after the caller's stream
and before its later work. An execution context runs one call at a time: use one backend per thread.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from promptseg.engine.backends.base import FlatPromptState, InferenceBackend
from promptseg.engine.backends.tensorrt_runtime import (
    PRECISIONS,
    SIDECAR_NAME,
    gpu_description,
    import_tensorrt,
    plan_path,
    read_sidecar,
    tensorrt_logger,
    tensorrt_module,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.export.graphs import (
    GRAPH_ROLES,
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    config_differences,
    encoding_names,
)
from promptseg.export.tensorrt_build import ShapeRange, build_engines, onnx_dtype_for
from promptseg.model import PromptSegNet
from promptseg.model.weights import weights_sha256

_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """tensorrt.DataType -> the torch dtype of the same layout; TypeError for types torch lacks
    (FP8, INT4)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise TypeError(f"TensorRT data type {name} has no PyTorch equivalent")
    return _TORCH_DTYPES[name]


class EngineRunner:
    """One deserialised engine and its execution context, fed and read through PyTorch CUDA tensors.

    runner({input name: tensor}) -> {output name: CUDA tensor}: inputs are moved to the device and
    cast to the engine's input types; outputs are allocated in the engine's output types with the
    shapes TensorRT infers from the input shapes.
    """

    def __init__(self, plan: bytes, device: torch.device, source: str | os.PathLike) -> None:
        trt = import_tensorrt()
        self.device = device
        self.source = str(source)
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(tensorrt_logger())  # must outlive the engine
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise PromptSegError(
                    f"{self.source}: TensorRT {trt.__version__} cannot load this engine "
                    "(built by another TensorRT version or for another GPU?); rebuild it"
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        )
        self.output_names = tuple(n for n in names if n not in self.input_names)
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: self._input_range(n) for n in self.input_names}

    def _input_range(self, name: str) -> ShapeRange:
        """min/opt/max shapes accepted for input `name` (the engine's shape when it is static)."""
        shape = tuple(self.engine.get_tensor_shape(name))
        if -1 not in shape:
            return ShapeRange(shape, shape, shape)
        return ShapeRange(*(tuple(dims) for dims in self.engine.get_tensor_profile_shape(name, 0)))

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """ValueError unless `shape` lies within the profile range of input `name`."""
        low, _, high = self.profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise ValueError(
                f"{self.source}: input {name!r} of shape {shape} is outside the engine's profile "
                f"(min {low}, max {high}); rebuild the engines with larger limits"
            )

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine on its own stream, ordered after the caller's stream and before its later
        work.

        Inside `torch.cuda.stream(self.stream)` that stream is torch.cuda.current_stream(), so the
        input copies, the output allocations and execute_async_v3 share it. A private stream spares
        TensorRT the extra synchronisation it adds on the legacy default stream.
        """
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.source}: missing engine inputs {', '.join(missing)}")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            bound = [self._bind_input(name, inputs[name]) for name in self.input_names]
            outputs = {name: self._bind_output(name) for name in self.output_names}
            if not self.context.execute_async_v3(
                torch.cuda.current_stream(self.device).cuda_stream
            ):
                errors = "; ".join(tensorrt_logger().last_errors) or "no error message"
                raise PromptSegError(f"{self.source}: TensorRT execution failed: {errors}")
        for tensor in (
            bound
        ):  # the caller may free its inputs at once: keep their memory until the engine is done
            tensor.record_stream(self.stream)
        caller.wait_stream(self.stream)
        for tensor in outputs.values():  # outputs live on in the caller's stream
            tensor.record_stream(caller)
        return outputs

    def _bind_input(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy/cast `tensor` for input `name`, set its shape and address; returns the bound
        tensor."""
        tensor = tensor.to(device=self.device, dtype=self.dtypes[name]).contiguous()
        shape = tuple(tensor.shape)
        self.check_shape(name, shape)
        if not self.context.set_input_shape(name, shape):
            raise ValueError(f"{self.source}: TensorRT rejected shape {shape} for input {name!r}")
        self.context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _bind_output(self, name: str) -> torch.Tensor:
        """A new CUDA tensor for output `name`, shaped as TensorRT infers from the bound inputs."""
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise PromptSegError(
                f"{self.source}: TensorRT could not infer the shape of output {name!r} ({shape})"
            )
        tensor = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        self.context.set_tensor_address(name, tensor.data_ptr())
        return tensor


def cuda_device(device: torch.device | str) -> torch.device:
    """`device` with an explicit index ("cuda" -> "cuda:<current device>"): engines are bound to one
    GPU."""
    device = torch.device(device)
    return (
        device
        if device.index is not None
        else torch.device(device.type, torch.cuda.current_device())
    )


def check_sidecar(
    sidecar: dict[str, Any], model: PromptSegNet, precision: str | None, path: Path
) -> None:
    """InputError naming the sidecar unless its engines were built from this model's configuration
    and weights, by this TensorRT version, for this GPU's compute capability (and `precision` when
    given)."""
    differing = config_differences(sidecar.get("config", {}), json.loads(model.config.to_json()))
    if differing:
        raise InputError(
            path,
            "engines were built for another model configuration (differs in "
            f"{', '.join(differing)})",
        )
    if sidecar.get("weights_sha256") != weights_sha256(model):
        raise InputError(
            path, "engines were built from other weights than this model's; rebuild them"
        )
    version = import_tensorrt().__version__
    if sidecar.get("tensorrt_version") != version:
        raise InputError(
            path,
            f"engines were built with TensorRT {sidecar.get('tensorrt_version')}, this is "
            f"{version}; rebuild them",
        )
    here = gpu_description()
    if sidecar.get("compute_capability") != here["compute_capability"]:
        raise InputError(
            path,
            f"engines were built for a {sidecar.get('gpu')} (compute capability "
            f"{sidecar.get('compute_capability')}), this is a {here['gpu']}; rebuild them here",
        )
    if precision is not None and sidecar.get("precision") != precision:
        raise InputError(
            path,
            f"engines were built for {sidecar.get('precision')}, not {precision}; rebuild them or "
            "drop precision",
        )


def read_plans(engine_dir: Path) -> dict[str, bytes]:
    """role -> serialised engine from an engine folder; InputError naming a missing plan."""
    plans = {}
    for role in GRAPH_ROLES:
        path = plan_path(engine_dir, role)
        if not path.is_file():
            raise InputError(
                path, "TensorRT engine not found; build it with promptseg export --format tensorrt"
            )
        plans[role] = path.read_bytes()
    return plans


def build_in_temp_dir(
    model: PromptSegNet, precision: str, build_options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Export the model to ONNX (in the dtype this TensorRT builds a `precision` engine from) and
    build both engines in a temporary folder -> (sidecar, plans)."""
    from promptseg.export.onnx_export import export_onnx

    dtype = getattr(torch, onnx_dtype_for(precision, import_tensorrt()))
    with tempfile.TemporaryDirectory(prefix="promptseg-tensorrt-") as tmp:
        onnx_dir = Path(tmp) / "onnx"
        export_onnx(model, onnx_dir, dtype=dtype)
        build_engines(onnx_dir, tmp, precision=precision, **build_options)
        return read_sidecar(tmp), read_plans(Path(tmp))


class TensorRTBackend(InferenceBackend):
    """TensorRT 10 or 11 engines of the prompt encoder and query decoder on one CUDA device.

    engine_dir: a folder from `promptseg export --format tensorrt` (plans +
    promptseg_tensorrt.json); without it the engines are built once here (build_options go to
    build_engines: max_batch, max_prompts, opt_batch, opt_prompts, timing_cache, workspace_gib).
    precision: fp32, fp16 (the default when building) or bf16; with engine_dir it must match the
    engines' when given.
    """

    name = "tensorrt"
    export_dir_option = "engine_dir"

    def __init__(
        self,
        model: PromptSegNet,
        device: torch.device,
        engine_dir: str | os.PathLike | None = None,
        precision: str | None = None,
        **build_options: Any,
    ) -> None:
        super().__init__(model, cuda_device(device))
        if precision is not None and precision not in PRECISIONS:
            raise InputError(
                "precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        if engine_dir is None:
            self.sidecar, plans = build_in_temp_dir(model, precision or "fp16", build_options)
            sources = {role: f"{role} engine (built for this backend)" for role in GRAPH_ROLES}
        else:
            if build_options:
                raise ValueError(
                    f"build options ({', '.join(sorted(build_options))}) only apply without "
                    "engine_dir"
                )
            self.sidecar = read_sidecar(engine_dir)
            check_sidecar(self.sidecar, model, precision, Path(engine_dir) / SIDECAR_NAME)
            plans = read_plans(Path(engine_dir))
            sources = {role: str(plan_path(engine_dir, role)) for role in GRAPH_ROLES}
        self.encoder = EngineRunner(plans["prompt_encoder"], self.device, sources["prompt_encoder"])
        self.decoder = EngineRunner(plans["query_decoder"], self.device, sources["query_decoder"])
        self.encoding_names = encoding_names(self.config)
        self.max_batch = self.decoder.profile[QUERY_INPUT_NAME].max[0]
        self.max_prompts = self.encoder.profile[PROMPT_INPUT_NAMES[0]].max[1]

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        """Needs TensorRT 10 or 11 (the tensorrt package), a CUDA GPU and a cuda device."""
        trt, why = tensorrt_module()
        if trt is None:
            return False, f"tensorrt backend needs the tensorrt package (TensorRT 10 or 11): {why}"
        if not torch.cuda.is_available():
            return False, "tensorrt backend needs a CUDA GPU, and PyTorch sees none"
        if torch.device(device).type != "cuda":
            return False, f"tensorrt backend runs on CUDA devices only, not {device}"
        return True, ""

    def encode(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> FlatPromptState:
        """(1, K, C, R, R), (1, K, R, R), (1, K) -> FlatPromptState of (1, H, K * n_i, D) CUDA
        tensors."""
        if images.shape[1] > self.max_prompts:
            raise ValueError(
                f"{images.shape[1]} prompts exceed the TensorRT engine's max_prompts of "
                f"{self.max_prompts}; "
                "rebuild the engines with a larger max_prompts"
            )
        outputs = self.encoder(dict(zip(PROMPT_INPUT_NAMES, (images, maps, types))))
        return FlatPromptState(tuple(outputs[name] for name in self.encoding_names))

    def decode(self, queries: torch.Tensor, state: FlatPromptState) -> torch.Tensor:
        """(B, C, R, R) queries, B <= max_batch -> (B, R, R) float32 CPU logits."""
        if queries.shape[0] > self.max_batch:
            raise ValueError(
                f"a query batch of {queries.shape[0]} exceeds the TensorRT engine's max_batch of "
                f"{self.max_batch}; "
                f"use a Segmenter max_batch <= {self.max_batch} or rebuild the engines with a "
                "larger max_batch"
            )
        inputs = {QUERY_INPUT_NAME: queries, **dict(zip(self.encoding_names, state.tensors))}
        return self.decoder(inputs)[LOGITS_NAME].float().cpu()
