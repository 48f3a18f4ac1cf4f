"""Test-session setup: Triton kernels run under the interpreter when no CUDA GPU is present, and
Hypothesis draws the same examples on every run when PROMPTSEG_HYPOTHESIS_PROFILE=ci (set by
.ci/run) so that CI results are reproducible; developers' runs keep exploring new examples."""

from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("PROMPTSEG_HYPOTHESIS_PROFILE", "default"))

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data when present (a developer checkout); skip otherwise (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA
