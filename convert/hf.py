"""Read a Hugging Face Gemma 3 checkpoint directory (single or sharded safetensors) tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..config import ModelConfig
from ..errors import ConversionError
from ..loader import load_config
from ..safetensors_io import SafetensorsFile, checkpoint_files
from ..weights import checkpoint_weights, sanitize_name


class HFSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._config = load_config(self.path)
        self.files = [SafetensorsFile(f) for f in checkpoint_files(self.path)]  # headers checked up front
        if not any(sanitize_name(n) for f in self.files for n in f.names):
            raise ConversionError(f"{self.path}: the safetensors files hold no Gemma 3 weights")

    def config(self) -> ModelConfig:
        return self._config

    def tensor_count(self) -> int:
        vision = self._config.vision is not None
        return sum(sanitize_name(n) is not None or vision for f in self.files for n in f.names)

    def tensors(self, native: bool = False) -> Iterator[tuple[str, mx.array]]:
        """(MLX name, tensor) at the checkpoint's precision; the vision tower in MLX layout."""
        return checkpoint_weights(self.files, vision=self._config.vision is not None)

    def tokenizer_model(self) -> bytes | None:
        f = self.path / "tokenizer.model"
        return f.read_bytes() if f.exists() else None
