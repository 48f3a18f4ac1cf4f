"""PromptSeg: universal medical image segmentation by visual prompts.

The public names (Segmenter, Prompt, PromptSegNet, ModelConfig) load on first use, so that
`import promptseg` (and `promptseg --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from promptseg.version import __version__

_PUBLIC = {
    "Segmenter": "promptseg.engine",
    "Prompt": "promptseg.engine",
    "PromptSegNet": "promptseg.model",
    "ModelConfig": "promptseg.model",
}
__all__ = ["Segmenter", "Prompt", "PromptSegNet", "ModelConfig", "__version__"]


def __getattr__(name: str) -> Any:
    """promptseg.Segmenter and the other public names, imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'promptseg' has no attribute {name!r}")
