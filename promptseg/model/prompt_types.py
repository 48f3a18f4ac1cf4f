"""The model's prompt vocabulary: each image the encoder sees is a query or a prompt of one type.

The ids index the encoder's type embedding (promptseg.model.encoder), so they are part of the
weights file format: append new types, never renumber. How sparse prompts are drawn and rasterised
belongs to promptseg.data.prompts.
"""

from __future__ import annotations

PROMPT_TYPES: dict[str, int] = {"query": 0, "mask": 1, "click": 2, "box": 3, "scribble": 4}
