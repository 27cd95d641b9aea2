"""Read safetensors files one tensor at a time, without torch and without loading the whole file.

The header is parsed and checked against the file size up front, so a truncated or corrupted
file fails with one clear message before any tensor is read. Only safetensors: never pickle.
Shared by the loader and the converter; writing is `mx.save_safetensors` (convert/writer.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ModelFileError

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "U32": np.uint32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names`, `shape(name)`, `get(name) -> mx.array`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length beyond end of file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelFileError(f"{self.path.name}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._base = 8 + n
        for name, e in header.items():
            start, end = e["data_offsets"]
            if e.get("dtype") not in _NUMPY:
                raise ModelFileError(f"{self.path.name}: tensor {name} has unsupported dtype {e.get('dtype')}")
            if self._base + end > size:
                raise ModelFileError(f"{self.path.name}: truncated (tensor {name} extends past the end of the file)")
            if end - start != int(np.prod(e["shape"])) * np.dtype(_NUMPY[e["dtype"]]).itemsize:
                raise ModelFileError(f"{self.path.name}: corrupted header (size of tensor {name} does not match its shape)")
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


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (single file or sharded with index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelFileError(f"{index.name}: malformed index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFileError(f"{directory}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ModelFileError(f"{directory}: no .safetensors weights found")
    return files
