"""Export of PromptSegNet for other runtimes, as two graphs: prompt encoder and query decoder.

    graphs.py       the two graphs as nn.Modules with flat, named inputs and outputs (torch only)
    onnx_export.py  ONNX files for ONNX Runtime and TensorRT (needs onnx and onnxscript)

`from promptseg.export import export_onnx` works, but the exporters (and onnx) are imported only
when one of their names is first used, so importing this package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "promptseg.export.onnx_export",
    "read_onnx_metadata": "promptseg.export.onnx_export",
    "PromptEncoderGraph": "promptseg.export.graphs",
    "QueryDecoderGraph": "promptseg.export.graphs",
    "encoding_names": "promptseg.export.graphs",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
