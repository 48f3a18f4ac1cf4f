"""The Triton kernels compile for CUDA GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' arithmetic but never compiles them, so a constexpr branch, a TF32
dot or a layout only the GPU path reaches could break unseen. `benchmarks.kernels.compile_check`
compiles them ahead of time with Triton's bundled toolchain; it runs in a subprocess because the
other kernel tests set TRITON_INTERPRET=1 in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend here")

REPO = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_cuda_with_tensor_cores_where_expected() -> None:
    """One variant of each kernel (bias, lengths, a padded head dim, the atomic dk/dv, TF32 fp32):
    all compile, and the PTX uses tensor cores exactly where the dots are fp16 or TF32."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels.compile_check", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(lines) == 5 and all(line.startswith("ok") for line in lines), result.stdout
