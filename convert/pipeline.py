"""`convert(source, out)`: a Hugging Face directory or a GGUF file -> an MLX model directory.

Tensor by tensor into an atomic output directory (see writer.py). Quantization is step 2:
`dtype` picks the float storage type for now.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import ConversionError, ModelFileError
from ..loader import DTYPES
from .writer import ShardWriter, atomic_directory, write_config


@dataclass
class ConversionReport:
    out: Path
    n_params: int
    n_bytes: int
    dtype: str

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / max(self.n_params, 1)


def open_source(source: str | Path):
    from .gguf import GGUFSource
    from .hf import HFSource

    p = Path(source)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConversionError(f"{p}: expected a .gguf file or a Hugging Face model directory")
        return GGUFSource(p)
    return HFSource(p)


def convert(
    source: str | Path,
    out: str | Path,
    dtype: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConversionReport:
    """Convert `source` into the MLX model directory `out`. Never modifies `source`."""
    src = open_source(source)
    out = Path(out)
    if out.resolve() == Path(source).resolve():
        raise ConversionError("the output directory must differ from the source")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (use --force to overwrite it)")
    if dtype is None:
        dtype = "float32" if src.path.is_file() else "bfloat16"  # GGUF blocks dequantize exactly to float32
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r} (choose {' or '.join(DTYPES)})")
    config = src.config()
    tokenizer = src.tokenizer_model()
    if tokenizer is None:
        warnings.warn(f"{source}: no tokenizer.model in the source; the converted model takes token ids only", stacklevel=2)
    with atomic_directory(out, force=force) as tmp:
        writer = ShardWriter(tmp)
        items = src.tensors()
        total = _count(src)
        n_params = 0
        for i, (name, w) in enumerate(items):
            w = mx.array(w).astype(DTYPES[dtype])
            n_params += w.size
            writer.add(name, w)
            if progress:
                progress(i + 1, total)
        writer.close()
        write_config(tmp, config.to_dict())
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer)
    return ConversionReport(out, n_params, writer.total_bytes, dtype)


def _count(src) -> int:
    if hasattr(src, "reader"):
        from .gguf import mlx_name

        return sum(mlx_name(t.name) is not None for t in src.reader.tensors)
    from ..loader import sanitize_name

    return sum(sanitize_name(n) is not None for f in src.files for n in f.names)
