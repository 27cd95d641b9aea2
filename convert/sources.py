"""`open_source(source)`: what a conversion or a quality check reads from, by the form of its name.

A .gguf file is a GGUFSource, a directory an HFSource (a Hugging Face checkpoint or a float MLX
directory: both are safetensors with a config.json), a hub id is downloaded first. Each source
has `path`, `config()`, `tensor_count()`, `tensors(native)` and `tokenizer_model()`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError, ModelFileError
from .gguf import GGUFSource
from .hf import HFSource
from .hub import download, looks_like_hub_id


def open_source(source: str | Path) -> GGUFSource | HFSource:
    p, name = Path(source).expanduser(), None
    if not p.exists() and looks_like_hub_id(str(source)):
        p, name = download(str(source)), str(source)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConversionError(f"{p}: expected a .gguf file or a Hugging Face model directory")
        return GGUFSource(p)
    return HFSource(p, name)
