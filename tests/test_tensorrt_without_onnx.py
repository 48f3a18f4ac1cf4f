"""Loading prebuilt TensorRT engines needs no onnx: the `gpu` extra does not install it."""

from __future__ import annotations

import subprocess
import sys

BLOCK_ONNX_THEN_CHECK = """
import importlib.abc, sys
class NoOnnx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("onnx is blocked in this test")
sys.meta_path.insert(0, NoOnnx())
from pathlib import Path
import json
from promptseg.engine.backends import tensorrt_backend
from promptseg.errors import InputError
from promptseg.model import ModelConfig, PromptSegNet
model = PromptSegNet(ModelConfig(resolution=32, widths=(8, 16, 32, 32), head_dim=16))
sidecar = {"config": json.loads(model.config.to_json()), "weights_sha256": "0" * 64}
try:
    tensorrt_backend.check_sidecar(sidecar, model, None, Path("engines/promptseg_tensorrt.json"))
except InputError as exc:
    assert "other weights" in str(exc), exc
else:
    raise SystemExit("a sidecar of other weights was accepted")
assert "onnx" not in sys.modules
print("ok")
"""


def test_engine_loading_path_imports_without_onnx() -> None:
    """The TensorRT backend module imports, and checks a sidecar's weights digest, with onnx
    blocked."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_ONNX_THEN_CHECK], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
