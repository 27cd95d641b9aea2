"""Converters from Hugging Face safetensors and GGUF checkpoints to MLX model directories."""

from .pipeline import ConversionReport, convert

__all__ = ["convert", "ConversionReport"]
