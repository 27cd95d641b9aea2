"""Converters from Hugging Face safetensors and GGUF checkpoints to MLX model directories."""

from .pipeline import RECIPES, ConversionReport, convert
from .quality import check

__all__ = ["convert", "check", "ConversionReport", "RECIPES"]
