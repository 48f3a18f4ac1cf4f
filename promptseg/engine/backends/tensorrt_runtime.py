"""TensorRT at run time: the version guard, the process-wide logger, the engine folder's layout and
its sidecar (docs/design.md section 6). Shared by the engine builder
(promptseg.export.tensorrt_build) and the runner (tensorrt_backend); it needs neither onnx nor a GPU
to import, and tensorrt only when a function asks for it."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from promptseg.errors import InputError, PromptSegError

SIDECAR_NAME = "promptseg_tensorrt.json"


SIDECAR_FORMAT = "promptseg-tensorrt"


SIDECAR_VERSION = 1


PRECISIONS = ("fp32", "fp16", "bf16")


MIN_TENSORRT_MAJOR = 10


MAX_TENSORRT_MAJOR = 11  # the newest major release whose API this module is written against


STRONGLY_TYPED_MAJOR = (
    11  # from here on the precision builder flags are gone: every network is strongly typed
)


log = logging.getLogger(__name__)


def plan_path(engine_dir: str | os.PathLike, role: str) -> Path:
    """Where build_engines writes the engine of graph `role`."""
    return Path(engine_dir) / f"{role}.plan"


def tensorrt_major(trt: ModuleType) -> int | None:
    """The major version of a tensorrt module (11 for "11.4.0.9"), or None when __version__ does not
    start with one."""
    match = re.match(r"\s*(\d+)(\.|$)", str(getattr(trt, "__version__", "")))
    return int(match[1]) if match else None


def tensorrt_module() -> tuple[ModuleType | None, str]:
    """(tensorrt, "") when TensorRT 10 or 11 imports, else (None, one-line reason)."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        return None, f"cannot import tensorrt ({_one_line(str(exc))})"
    major = tensorrt_major(tensorrt)
    if major is None or not MIN_TENSORRT_MAJOR <= major <= MAX_TENSORRT_MAJOR:
        found = _one_line(str(getattr(tensorrt, "__version__", "of unknown version")))
        supported = f"TensorRT {MIN_TENSORRT_MAJOR} and {MAX_TENSORRT_MAJOR}"
        return None, f"found TensorRT {found}, but promptseg supports {supported} only"
    return tensorrt, ""


def import_tensorrt() -> ModuleType:
    """The tensorrt module (TensorRT 10 or 11); PromptSegError saying why when it cannot be used."""
    trt, why = tensorrt_module()
    if trt is None:
        raise PromptSegError(_missing(why))
    return trt


def _missing(reason: str) -> str:
    return (
        f"tensorrt export needs the tensorrt package (TensorRT 10 or 11) and a CUDA GPU: {reason}"
    )


def strongly_typed(trt: ModuleType) -> bool:
    """Whether this TensorRT builds every network strongly typed (11 on), so precision comes from
    the graph."""
    major = tensorrt_major(trt)
    return major is not None and major >= STRONGLY_TYPED_MAJOR


@functools.cache
def tensorrt_logger() -> Any:
    """The one process-wide TensorRT logger: warnings and errors go to Python logging, errors are
    kept.

    TensorRT expects a single logger per process (builder and runtime alike); `last_errors`
    holds the most recent error messages for one-line reports.
    """
    trt = import_tensorrt()

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.last_errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_errors = (self.last_errors + [msg])[-5:]
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    return RecordingLogger()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_sidecar(engine_dir: str | os.PathLike) -> dict[str, Any]:
    """The sidecar JSON of an engine folder; InputError naming the file when missing or
    unreadable."""
    path = Path(engine_dir) / SIDECAR_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            path, "not found; build the engines with promptseg export --format tensorrt"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable TensorRT sidecar: {_one_line(str(exc))}") from None
    if (data.get("format"), data.get("version")) != (SIDECAR_FORMAT, SIDECAR_VERSION):
        found = f"format {data.get('format')!r} version {data.get('version')!r}"
        raise InputError(
            path, f"not a {SIDECAR_FORMAT} version {SIDECAR_VERSION} sidecar ({found})"
        )
    return data


def gpu_description() -> dict[str, str]:
    """Name and compute capability ("9.0") of the current CUDA GPU, which a plan is built for."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def require_tensorrt_gpu() -> ModuleType:
    """import_tensorrt(), plus a check that PyTorch sees a CUDA GPU for the builder to time kernels
    on."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise PromptSegError(
            _missing("no CUDA GPU is visible (torch.cuda.is_available() is False)")
        )
    return trt
