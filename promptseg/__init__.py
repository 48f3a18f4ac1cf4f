"""PromptSeg: universal medical image segmentation by visual prompts."""
from promptseg.engine import Prompt, Segmenter
from promptseg.model import ModelConfig, PromptSegNet

__version__ = "0.1.0"
__all__ = ["Segmenter", "Prompt", "PromptSegNet", "ModelConfig", "__version__"]
