"""`open_source(source)`: what a conversion or a quality check reads from, by the form of its name.

A .gguf file is a GGUFSource, a directory an HFSource (a Hugging Face checkpoint or a float MLX
directory: both are safetensors with a config.json), a hub id is downloaded first. Each source
has `path`, `config()`, `shapes()`, `tensor_count()`, `tensors(native)` and `tokenizer_model()`.
Before a source is handed out, its text tensors are checked against its config (every one there,
at its shape, none extra), so a damaged file fails here rather than half-way through a conversion.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx.utils import tree_flatten

from ..errors import ConversionError, ModelFileError
from ..model import Model
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
        src = GGUFSource(p)
    elif p.is_dir():
        src = HFSource(p, name)
    else:
        raise ModelFileError(f"{p}: not a file or a directory")
    check_shapes(src)
    return src


def check_shapes(src) -> None:
    """The text tensors are exactly those the config's model has, at their shapes; else one line naming one."""
    got = src.shapes()
    quantized = next((n for n in got if n.endswith((".scales", ".biases"))), None)
    if quantized:
        raise ConversionError(f"{src.path}: already quantized ({quantized}); convert from a float checkpoint or a GGUF")
    config = dataclasses.replace(src.config(), quantization=None, vision=None)
    expected = dict(tree_flatten(Model(config).parameters()))  # lazy: nothing is computed
    for name, shape in got.items():
        if name.startswith("model.") and name not in expected:
            raise ModelFileError(f"{src.path}: unexpected tensor {name} (its config has "
                                 f"{config.text.num_hidden_layers} layers and no such parameter)")
        if name in expected and tuple(expected[name].shape) != tuple(shape):
            raise ModelFileError(f"{src.path}: tensor {name} is {'x'.join(map(str, shape))}, "
                                 f"its config needs {'x'.join(map(str, expected[name].shape))}")
    missing = [n for n in expected if n not in got]
    if missing:
        raise ModelFileError(f"{src.path}: no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + ": the weights do not match the config")
