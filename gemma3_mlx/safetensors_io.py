"""Read safetensors files one tensor at a time, without torch and without loading the whole file.

The header is parsed and checked up front (its length, every dtype, shape and data_offsets,
against each other, the file size and the other tensors), so a truncated or corrupted file
fails with one message naming the problem before any tensor is read. Only safetensors: never pickle.
Shared by the loader and the converter; writing is `mx.save_safetensors` (convert/writer.py).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ModelFileError
from .files import read_json

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "U32": np.uint32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER = 100 << 20  # the safetensors format's own limit


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names`, `shape(name)`, `get(name) -> mx.array`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        name = self.path.name
        try:
            if not self.path.is_file():
                raise ValueError("not a regular file")
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= min(MAX_HEADER, size - 8):
                    raise ValueError(f"its header claims {n:,} bytes, the file has {size:,}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:
            raise ModelFileError(f"{name}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{name}: not a readable safetensors file (its header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise ModelFileError(f"{name}: corrupted header (__metadata__ is not an object)")
        self._entries = header
        self._base = 8 + n
        spans = []
        for key, e in header.items():
            start, end = _check_entry(name, key, e)
            if self._base + end > size:
                raise ModelFileError(f"{name}: truncated: tensor {key} needs bytes up to {self._base + end:,}, "
                                     f"the file has {size:,}")
            if end > start:
                spans.append((start, end, key))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if end_a > start_b:
                raise ModelFileError(f"{name}: corrupted header (the data of tensors {a} and {b} overlap)")
        self._lazy: dict[str, mx.array] = {}

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def get(self, name: str) -> mx.array:
        """The tensor, lazily: MLX reads its bytes from the file straight into the array when it
        is evaluated, so no mapped copy of the file stays resident beside the loaded weights."""
        if name not in self._lazy:  # each array is handed out once; asking again reads again
            try:
                self._lazy = mx.load(str(self.path))
            except (RuntimeError, ValueError) as e:
                raise ModelFileError(f"{self.path.name}: not a readable safetensors file ({e})") from None
        return self._lazy.pop(name)


def _check_entry(file: str, name: str, e) -> tuple[int, int]:
    """(start, end) of a header entry whose dtype, shape and offsets agree; ModelFileError naming the problem."""
    bad = f"{file}: corrupted header (tensor {name}"
    if not isinstance(e, dict):
        raise ModelFileError(f"{bad} is not described by an object)")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _NUMPY:
        raise ModelFileError(f"{file}: tensor {name} has unsupported dtype {dtype!r}"[:300])
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise ModelFileError(f"{bad} has an impossible shape {shape!r})"[:300])
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise ModelFileError(f"{bad} has impossible data_offsets {offsets!r})"[:300])
    start, end = offsets
    if end - start != math.prod(shape) * np.dtype(_NUMPY[dtype]).itemsize:
        raise ModelFileError(f"{bad}: {end - start:,} bytes do not hold a {dtype} tensor of shape {shape})")
    return start, end


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 50


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (single file or sharded with index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, 64 << 20, "a safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        # Shard names stay inside the directory: "../x" or "/etc/passwd" is not a shard.
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and Path(f).name == f
                                                       for f in weight_map.values()):
            raise ModelFileError(f"{index}: malformed index (weight_map must map names to shard files in the directory)")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFileError(f"{directory}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ModelFileError(f"{directory}: no .safetensors weights found")
    return files
