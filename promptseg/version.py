"""The version of PromptSeg (one place; setup.py keeps the same number)."""

__version__ = "0.1.0"
