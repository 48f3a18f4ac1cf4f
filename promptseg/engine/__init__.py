"""Inference: the Segmenter, its prompt cache and volume streaming."""

from promptseg.engine.prompt_cache import PromptCache
from promptseg.engine.prompts_input import Prompt
from promptseg.engine.segmenter import EncodedPrompts, LabelResult, Segmenter, VolumeResult

__all__ = ["Segmenter", "EncodedPrompts", "LabelResult", "VolumeResult", "Prompt", "PromptCache"]
