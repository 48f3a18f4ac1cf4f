"""The PromptSeg model."""
from promptseg.model.config import ModelConfig
from promptseg.model.network import PromptSegNet, count_parameters
from promptseg.model.prompt_encoder import PromptEncoding

__all__ = ["ModelConfig", "PromptSegNet", "PromptEncoding", "count_parameters"]
