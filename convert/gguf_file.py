"""Read a GGUF file's metadata and tensor table with bounded work: `GGUFFile(path)`.

Every count, length, dimension and offset is checked against the bytes that are left and against
sane limits before anything is allocated or looped over, so a damaged or hostile file fails in
milliseconds with one message naming the problem (a 2^40-entry array is refused before a single
entry is read). Arrays stay in the memory-mapped file until asked for: opening the 270M skips its
262,144 vocabulary strings without decoding them (~0.1 s; the `gguf` package's reader decodes
them all, ~20 s). Tensors must lie in the file, aligned, without overlaps or unexplained gaps
(a tensor given another block type no longer fits its bytes). This module knows the format
only: Gemma 3 (gguf.py) and dequantizing (gguf.quants, gguf_blocks.py) live elsewhere.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFileError

MAX_KV, MAX_TENSORS, MAX_DIMS = 1 << 16, 1 << 16, 4  # llama.cpp: GGML_MAX_DIMS = 4
MAX_KEY, MAX_STRING = 1 << 16, 1 << 26  # a chat template is ~20 KB; a key or tensor name far less
MAX_ELEMENTS = 1 << 40  # per tensor: 100x the largest matrix of Gemma 3 27B

STRING, ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class Array:
    """A metadata array left in the file: `count` items of `item_type` from byte `offset`."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as GGUF lists it: innermost (contiguous) dimension first
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


class GGUFFile:
    """A validated GGUF file: `fields` (key -> scalar, str or Array), `tensors` (in table order)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        try:
            with open(self.path, "rb") as f:
                self.size = f.seek(0, 2)
                if self.size < 24:
                    raise self.error(f"not a GGUF file ({self.size} bytes)")
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFileError(f"{self.name}: cannot read it ({e.strerror or e})") from None
        if self.buf[:4] != b"GGUF":
            raise self.error("not a GGUF file (no GGUF magic at its start)")
        self.pos = 4
        version = self._u("<I", "version")
        if version not in (2, 3):
            raise self.error(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._u("<Q", "tensor count"), self._u("<Q", "metadata count")
        # Each entry takes at least 13 bytes (key length, type, a one-byte value), each tensor 28.
        if n_kv > MAX_KV or n_kv * 13 > self.size - self.pos:
            raise self.error(f"the header claims {n_kv:,} metadata entries, more than the file can hold")
        if n_tensors > MAX_TENSORS or n_tensors * 28 > self.size - self.pos:
            raise self.error(f"the header claims {n_tensors:,} tensors, more than the file can hold")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._str(MAX_KEY, "a metadata key").decode("utf-8", "replace")
            if key in self.fields:
                raise self.error(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._u("<I", f"the type of {key}"), key)
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
                or alignment & (alignment - 1):
            raise self.error(f"general.alignment is {alignment!r}, not a power of two up to 65,536")
        self.tensors = [self._tensor_info(alignment) for _ in range(n_tensors)]
        self.data_start = -(-self.pos // alignment) * alignment
        self._check_layout(alignment)

    def error(self, message: str) -> ModelFileError:
        return ModelFileError(f"{self.name}: {message}")

    # ---- the header, read with bounds ------------------------------------------------------------

    def _take(self, n: int, what: str) -> int:
        """Advance over n bytes; the position before them."""
        if n > self.size - self.pos:
            raise self.error(f"truncated: {what} needs bytes up to {self.pos + n:,}, the file has {self.size:,}")
        start, self.pos = self.pos, self.pos + n
        return start

    def _u(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt), what))[0]

    def _str(self, limit: int, what: str) -> bytes:
        n = self._u("<Q", what)
        if n > limit:
            raise self.error(f"{what} claims to be {n:,} bytes long (at most {limit:,})")
        start = self._take(n, what)
        return self.buf[start:self.pos]

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self._u(_SCALARS[vtype], key)
        if vtype == STRING:
            return self._str(MAX_STRING, key).decode("utf-8", "replace")
        if vtype != ARRAY:
            raise self.error(f"metadata {key} has unknown value type {vtype}")
        item, count = self._u("<I", key), self._u("<Q", key)
        offset = self.pos
        if item in _SCALARS:
            self._take(count * struct.calcsize(_SCALARS[item]), f"{key} ({count:,} items)")
        elif item == STRING:
            if count * 8 > self.size - self.pos:  # each string has an 8-byte length
                raise self.error(f"truncated: {key} claims {count:,} strings, more than the file holds")
            self._skip_strings(count, key)
        else:
            raise self.error(f"metadata {key} is an array of type {item}, which GGUF readers do not take")
        return Array(item, count, offset)

    def _skip_strings(self, count: int, key: str) -> None:
        # The hot loop of opening a file (262,144 vocabulary strings): lengths only, nothing decoded.
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise self.error(f"truncated: {key} string {i:,} of {count:,} lies past the end of the file")
            n = unpack(buf, pos)[0]
            pos += 8 + n
            if n > MAX_STRING or pos > size:
                raise self.error(f"truncated: {key} string {i:,} claims {n:,} bytes, past the end of the file")
        self.pos = pos

    def _tensor_info(self, alignment: int) -> TensorInfo:
        name = self._str(MAX_KEY, "a tensor name").decode("utf-8", "replace")
        n_dims = self._u("<I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.error(f"tensor {name} has {n_dims:,} dimensions (1 to {MAX_DIMS})")
        shape = tuple(self._u("<Q", name) for _ in range(n_dims))
        if min(shape) < 1 or max(shape) > MAX_ELEMENTS or int(np.prod(shape, dtype=object)) > MAX_ELEMENTS:
            raise self.error(f"tensor {name} has an impossible shape {list(shape)}")
        type_id = self._u("<I", name)
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.error(f"tensor {name} has unknown block type {type_id}") from None
        if shape[0] % block:
            raise self.error(f"tensor {name}: rows of {shape[0]} values are not whole {qtype.name} blocks of {block}")
        offset = self._u("<Q", name)
        if offset % alignment:
            raise self.error(f"tensor {name} starts at {offset:,}, not a multiple of the alignment {alignment}")
        n_bytes = int(np.prod(shape[1:], dtype=object)) * (shape[0] // block) * type_size
        return TensorInfo(name, shape, qtype, offset, n_bytes)

    def _check_layout(self, alignment: int) -> None:
        names = set()
        for t in self.tensors:
            if t.name in names:
                raise self.error(f"tensor {t.name} appears twice")
            names.add(t.name)
            end = self.data_start + t.offset + t.n_bytes
            if end > self.size:
                raise self.error(f"truncated: tensor {t.name} needs bytes up to {end:,}, the file has {self.size:,}")
        # Writers lay tensors out back to back, each padded to the alignment: anything else means
        # a tensor's type or shape does not describe its bytes.
        ordered = sorted(self.tensors, key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            padded = -(-(a.offset + a.n_bytes) // alignment) * alignment
            if padded > b.offset:
                raise self.error(f"tensor {a.name} ({a.type.name}, {a.n_bytes:,} bytes) overlaps tensor {b.name}: "
                                 "its block type or shape does not match its data")
            if padded < b.offset:
                raise self.error(f"tensor {a.name} ({a.type.name}, {a.n_bytes:,} bytes) leaves {b.offset - padded:,} "
                                 "bytes unexplained before the next tensor: its block type or shape does not match its data")

    # ---- values, read on demand ------------------------------------------------------------------

    def numbers(self, a: Array) -> np.ndarray:
        """A numeric array's values (copied out of the file)."""
        if a.item_type not in _NUMPY:
            raise TypeError("not a numeric array")
        return np.frombuffer(self.buf, _NUMPY[a.item_type], a.count, a.offset).copy()

    def strings(self, a: Array) -> list[bytes]:
        """A string array's values, as bytes (their lengths were checked when the file was opened)."""
        if a.item_type != STRING:
            raise TypeError("not a string array")
        out, pos, buf, unpack = [], a.offset, self.buf, struct.Struct("<Q").unpack_from
        for _ in range(a.count):
            n = unpack(buf, pos)[0]
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        return out

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as the `gguf` package's reader gives them: F32 and F16 as
        (..., shape[0]) arrays, other types (BF16 included) as (rows, bytes per row) uint8."""
        start = self.data_start + t.offset
        rows = tuple(reversed(t.shape[1:]))
        if t.type in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[t.type]
            return np.frombuffer(self.buf, dtype, t.n_bytes // np.dtype(dtype).itemsize, start).reshape(*rows, t.shape[0])
        raw = np.frombuffer(self.buf, np.uint8, t.n_bytes, start)
        return raw.reshape(*rows, -1) if rows else raw
