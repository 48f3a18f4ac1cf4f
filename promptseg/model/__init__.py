"""The PromptSeg model."""

from promptseg.model.config import ModelConfig
from promptseg.model.encoding import PromptEncoding
from promptseg.model.network import PromptSegNet, count_parameters

__all__ = ["ModelConfig", "PromptSegNet", "PromptEncoding", "count_parameters"]
