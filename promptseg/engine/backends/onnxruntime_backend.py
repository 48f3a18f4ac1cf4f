"""`onnxruntime` backend: the two exported ONNX graphs (promptseg.export.onnx_export) in ONNX
Runtime.

    encode: prompt_encoder.onnx, (1, K, C, R, R), (1, K, R, R), (1, K) -> FlatPromptState of numpy
    arrays
            (1, H, K * n_i, D), ordered as encoding_names
    decode: query_decoder.onnx, (B, C, R, R) + that state -> (B, R, R) float32 CPU torch tensor

With model_dir the files of an earlier `promptseg export --format onnx` are loaded and their
metadata checked against the model; without it the model is exported once into a temporary
folder, which is deleted as soon as the sessions hold the graphs. The CPU execution provider runs
by default; on a cuda device the CUDA provider, when this onnxruntime build has it. Inputs and
the prompt state cross the host boundary on every call, so the state stays numpy on any device.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptseg.engine.backends.base import BackendUnavailable, FlatPromptState, InferenceBackend
from promptseg.errors import InputError
from promptseg.export.graphs import (
    GRAPH_ROLES,
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    encoding_names,
    graph_paths,
)
from promptseg.model import PromptSegNet

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
}


class OnnxRuntimeBackend(InferenceBackend):
    """PromptSegNet as two ONNX Runtime sessions, dynamic in the prompt count K and the batch B.

    model_dir: folder with prompt_encoder.onnx and query_decoder.onnx exported from this model
    (None: export now); providers: ONNX Runtime execution providers (None: chosen from `device`);
    threads: intra-op threads per session (None: torch.get_num_threads()).
    """

    name = "onnxruntime"
    export_dir_option = "model_dir"

    def __init__(
        self,
        model: PromptSegNet,
        device: torch.device,
        model_dir: str | os.PathLike | None = None,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(model, device)
        self.providers = list(providers) if providers is not None else default_providers(device)
        self.threads = threads or torch.get_num_threads()
        self.names = encoding_names(self.config)
        if model_dir is None:
            from promptseg.export.onnx_export import export_onnx

            with tempfile.TemporaryDirectory(prefix="promptseg-onnx-") as folder:
                self.encoder, self.decoder = self._load(export_onnx(model, folder))
        else:
            self.encoder, self.decoder = self._load(checked_graphs(model_dir, model))
        self.encoder_types, self.decoder_types = (
            input_types(self.encoder),
            input_types(self.decoder),
        )

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        try:
            importlib.import_module("onnx")  # reads and checks the graphs' metadata
            import onnxruntime
        except ImportError as exc:
            return (
                False,
                f"onnxruntime backend unavailable: {exc} (pip install 'promptseg[export]')",
            )
        problem = provider_problem(device, onnxruntime.get_available_providers())
        return problem is None, problem or ""

    def _load(self, paths: dict[str, Path]) -> tuple[Any, Any]:
        """(encoder session, decoder session) for {role: path}; InputError naming a file ONNX
        Runtime rejects."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = (
            3  # errors only; optimiser notes would reach the user's terminal
        )
        sessions = []
        for role in GRAPH_ROLES:
            try:
                sessions.append(
                    onnxruntime.InferenceSession(
                        str(paths[role]), options, providers=self.providers
                    )
                )
            except (
                Exception
            ) as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented types
                raise InputError(
                    paths[role], f"ONNX Runtime cannot load it: {str(exc).splitlines()[0]}"
                ) from None
        return sessions[0], sessions[1]

    def encode(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> FlatPromptState:
        """(1, K, C, R, R), (1, K, R, R), (1, K) -> FlatPromptState of (1, H, K * n_i, D) numpy
        arrays."""
        feeds = session_feeds(
            self.encoder_types, dict(zip(PROMPT_INPUT_NAMES, (images, maps, types)))
        )
        return FlatPromptState(tuple(self.encoder.run(self.names, feeds)))

    def decode(self, queries: torch.Tensor, state: FlatPromptState) -> torch.Tensor:
        """(B, C, R, R) + encode()'s state -> (B, R, R) float32 CPU logits."""
        feeds = session_feeds(
            self.decoder_types, {QUERY_INPUT_NAME: queries, **dict(zip(self.names, state.tensors))}
        )
        (logits,) = self.decoder.run([LOGITS_NAME], feeds)
        return torch.from_numpy(logits).float()


def checked_graphs(model_dir: str | os.PathLike, model: PromptSegNet) -> dict[str, Path]:
    """{role: path} of the graphs in `model_dir` after checking their metadata against `model` and
    their tensors against the digest recorded at export (InputError)."""
    from promptseg.export.onnx_export import (
        check_graph_metadata,
        check_graph_tensors,
        read_onnx_metadata,
    )
    from promptseg.model.weights import weights_sha256

    paths = graph_paths(model_dir)
    digest = weights_sha256(model)
    for role, path in paths.items():
        metadata = read_onnx_metadata(path)
        check_graph_metadata(metadata, path, role, model.config, digest)
        check_graph_tensors(path, metadata)
    return paths


def provider_problem(device: torch.device, available: Sequence[str]) -> str | None:
    """Why ONNX Runtime with `available` providers cannot run on `device` (one line), or None."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return None
        return (
            "onnxruntime backend on cuda needs the CUDAExecutionProvider (pip install "
            "onnxruntime-gpu); "
            f"this onnxruntime has {', '.join(available)}"
        )
    return f"onnxruntime backend runs on cpu or cuda, not {device.type}"


def default_providers(device: torch.device) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for `device`: CUDA (then CPU) on cuda, else CPU; BackendUnavailable
    otherwise."""
    import onnxruntime

    problem = provider_problem(device, onnxruntime.get_available_providers())
    if problem is not None:
        raise BackendUnavailable(problem)
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def input_types(session: Any) -> dict[str, type[np.generic]]:
    """{input name: numpy element type} the session's graph declares, in its input order."""
    return {spec.name: _NUMPY_TYPES[spec.type] for spec in session.get_inputs()}


def session_feeds(
    types: dict[str, type[np.generic]], values: dict[str, torch.Tensor | np.ndarray]
) -> dict[str, np.ndarray]:
    """Inputs as contiguous numpy arrays in the element `types` (from input_types) of a session's
    inputs."""
    feeds = {}
    for name, dtype in types.items():
        value = values[name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        feeds[name] = np.ascontiguousarray(array, dtype=dtype)
    return feeds
