"""Converters from Hugging Face safetensors and GGUF checkpoints to MLX model directories."""
