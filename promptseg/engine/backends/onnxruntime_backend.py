"""`onnxruntime` backend: the two exported ONNX graphs (promptseg.export.onnx_export) in ONNX Runtime.

    encode: prompt_encoder.onnx, (1, K, C, R, R), (1, K, R, R), (1, K) -> FlatPromptState of numpy arrays
            (1, H, K * n_i, D), ordered as encoding_names
    decode: query_decoder.onnx, (B, C, R, R) + that state -> (B, R, R) float32 CPU torch tensor

With model_dir the files of an earlier `promptseg export --format onnx` are loaded and their
metadata checked against the model; without it the model is exported once into a temporary
folder, which is deleted as soon as the sessions hold the graphs. The CPU execution provider runs
by default; on a cuda device the CUDA provider, when this onnxruntime build has it. Inputs and
the prompt state cross the host boundary on every call, so the state stays numpy on any device.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptseg.engine.backends.base import BackendUnavailable, FlatPromptState, InferenceBackend
from promptseg.errors import InputError
from promptseg.export.graphs import LOGITS_NAME, PROMPT_INPUT_NAMES, QUERY_INPUT_NAME, encoding_names
from promptseg.model import PromptSegNet

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OnnxRuntimeBackend(InferenceBackend):
    """PromptSegNet as two ONNX Runtime sessions, dynamic in the prompt count K and the batch B.

    model_dir: folder with prompt_encoder.onnx and query_decoder.onnx exported from this model
    (None: export now); providers: ONNX Runtime execution providers (None: chosen from `device`);
    threads: intra-op threads per session (None: torch.get_num_threads()).
    """

    name = "onnxruntime"

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

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401  (reads and checks the graphs' metadata)
            import onnxruntime
        except ImportError as exc:
            return False, f"onnxruntime backend unavailable: {exc} (pip install 'promptseg[export]')"
        problem = provider_problem(device, onnxruntime.get_available_providers())
        return problem is None, problem or ""

    def _load(self, paths: dict[str, Path]) -> tuple[Any, Any]:
        """(encoder session, decoder session) for {role: path}; InputError naming a file ONNX Runtime rejects."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only; optimiser notes would reach the user's terminal
        sessions = []
        for role in ("prompt_encoder", "query_decoder"):
            try:
                sessions.append(onnxruntime.InferenceSession(str(paths[role]), options, providers=self.providers))
            except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented types
                raise InputError(paths[role], f"ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
        return sessions[0], sessions[1]

    def encode(self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> FlatPromptState:
        """(1, K, C, R, R), (1, K, R, R), (1, K) -> FlatPromptState of (1, H, K * n_i, D) numpy arrays."""
        feeds = session_feeds(self.encoder, dict(zip(PROMPT_INPUT_NAMES, (images, maps, types))))
        return FlatPromptState(tuple(self.encoder.run(self.names, feeds)))

    def decode(self, queries: torch.Tensor, state: FlatPromptState) -> torch.Tensor:
        """(B, C, R, R) + encode()'s state -> (B, R, R) float32 CPU logits."""
        feeds = session_feeds(self.decoder, {QUERY_INPUT_NAME: queries, **dict(zip(self.names, state.tensors))})
        (logits,) = self.decoder.run([LOGITS_NAME], feeds)
        return torch.from_numpy(logits).float()


def checked_graphs(model_dir: str | os.PathLike, model: PromptSegNet) -> dict[str, Path]:
    """{role: path} of the graphs in `model_dir` after checking their metadata against `model` (InputError)."""
    from promptseg.export.onnx_export import check_graph_metadata, graph_paths, read_onnx_metadata

    paths = graph_paths(model_dir)
    for role, path in paths.items():
        check_graph_metadata(read_onnx_metadata(path), path, role, model)
    return paths


def provider_problem(device: torch.device, available: Sequence[str]) -> str | None:
    """Why ONNX Runtime with `available` providers cannot run on `device` (one line), or None."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return None
        return ("onnxruntime backend on cuda needs the CUDAExecutionProvider (pip install onnxruntime-gpu); "
                f"this onnxruntime has {', '.join(available)}")
    return f"onnxruntime backend runs on cpu or cuda, not {device.type}"


def default_providers(device: torch.device) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for `device`: CUDA (then CPU) on cuda, else CPU; BackendUnavailable otherwise."""
    import onnxruntime

    problem = provider_problem(device, onnxruntime.get_available_providers())
    if problem is not None:
        raise BackendUnavailable(problem)
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_feeds(session: Any, values: dict[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs as contiguous numpy arrays in the element types the session's graph declares."""
    feeds = {}
    for spec in session.get_inputs():
        value = values[spec.name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        feeds[spec.name] = np.ascontiguousarray(array, dtype=_NUMPY_TYPES[spec.type])
    return feeds
