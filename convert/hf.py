"""Read a Hugging Face Gemma 3 checkpoint directory (single or sharded safetensors) tensor by tensor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..config import ModelConfig, instruction_tuned_from_name
from ..errors import ConversionError, ModelFileError
from ..files import read_bytes, read_json
from ..loader import load_config
from ..safetensors_io import SafetensorsFile, checkpoint_files
from ..tokenizer import MAX_TOKENIZER_BYTES, check_tokenizer
from ..vision import vision_name
from ..weights import checkpoint_weights, sanitize_name


class HFSource:
    def __init__(self, path: str | Path, name: str | None = None):
        """`name`: what the user called it (a hub id), when the path is a download's snapshot directory."""
        self.path = Path(path)
        self._config = load_config(self.path)
        if self._config.instruction_tuned is None or name:
            self._config = dataclasses.replace(self._config, instruction_tuned=self._instruction_tuned(name))
        self.files = [SafetensorsFile(f) for f in checkpoint_files(self.path)]  # headers checked up front
        if not any(sanitize_name(n) for f in self.files for n in f.names):
            raise ConversionError(f"{self.path}: the safetensors files hold no Gemma 3 weights")

    def config(self) -> ModelConfig:
        return self._config

    def _instruction_tuned(self, name: str | None) -> bool:
        """By the name (hub id, directory, transformers' _name_or_path), else by a chat template beside the weights."""
        raw = read_json(self.path / "config.json", 1 << 20, "a config.json")
        for n in (name, self.path.resolve().name, raw.get("_name_or_path") if isinstance(raw, dict) else None):
            said = instruction_tuned_from_name(str(n)) if n else None
            if said is not None:
                return said
        if (self.path / "chat_template.jinja").exists() or (self.path / "chat_template.json").exists():
            return True
        try:
            settings = read_json(self.path / "tokenizer_config.json", 64 << 20, "a tokenizer_config.json")
        except ModelFileError:
            return False
        return isinstance(settings, dict) and "chat_template" in settings

    def tensor_count(self) -> int:
        vision = self._config.vision is not None
        return sum(sanitize_name(n) is not None or (vision and vision_name(n) is not None)
                   for f in self.files for n in f.names)

    def tensors(self, native: bool = False) -> Iterator[tuple[str, mx.array]]:
        """(MLX name, tensor) at the checkpoint's precision; the vision tower in MLX layout."""
        return checkpoint_weights(self.files, vision=self._config.vision is not None)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """MLX name -> shape of every text-model tensor (the vision tower's are checked when loaded)."""
        return {n: f.shape(k) for f in self.files for k in f.names if (n := sanitize_name(k)) is not None}

    def tokenizer_model(self) -> bytes | None:
        """tokenizer.model's bytes, checked to load and to fit the embedding; None if there is none."""
        f = self.path / "tokenizer.model"
        if not f.exists():
            return None
        proto = read_bytes(f, MAX_TOKENIZER_BYTES, "a tokenizer.model")
        check_tokenizer(proto, self._config.text.vocab_size, str(f))
        return proto
