"""Write an MLX model directory atomically, one shard at a time.

Everything goes into a temporary directory beside OUT that is renamed at the end; on any
failure or Ctrl-C it is removed, so a failed conversion leaves nothing behind. Tensors are
streamed to disk as they come, so memory stays near one tensor, not a shard or the model.
"""

from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from .._atomic import make_temp_dir, output_problem, publish, write_marker
from ..errors import ConversionError

SHARD_BYTES = 2 << 30
HEADER_BYTES = 1 << 18  # reserved per shard for its header: room for about 2,000 tensors
_SAFETENSORS = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
                mx.uint16: "U16", mx.int16: "I16", mx.uint8: "U8", mx.int8: "I8", mx.int64: "I64", mx.bool_: "BOOL"}


def check_output(out: Path, force: bool, keep=()) -> None:
    """Refuse an output a conversion may not write (see _atomic.output_problem), before any work."""
    problem = output_problem(Path(out).expanduser(), force, keep)
    if problem:
        raise ConversionError(problem)


@contextmanager
def atomic_directory(out: Path, force: bool = False, keep=()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out` when the block succeeds.

    Refused up front and again at the end (the place may change meanwhile): an `out` that is or
    contains one of `keep` (the source), and an existing `out` unless `force` and it is a model we
    converted (see _atomic.why_not_replace). The replacement is atomic; on any failure, Ctrl-C or
    SIGTERM (the CLI turns it into an exception) the temporary directory is removed, and one left
    by a killed process is swept by the next conversion into the same place."""
    out = Path(out).expanduser()
    check_output(out, force, keep)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        yield tmp
        write_marker(tmp)
        problem = output_problem(out, force, keep)
        if problem:
            raise ConversionError(problem.replace("already exists", "appeared while converting (another conversion?)"))
        try:
            publish(tmp, out, replace=force)
        except FileExistsError:
            raise ConversionError(f"{out} appeared while converting (another conversion?); "
                                  "use --force to replace a model converted by gemma3-mlx") from None
    except BaseException:  # Ctrl-C included: never leave a half-written model
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Streams tensors into `model-0000i-of-0000n.safetensors` shards plus an index.

    Each tensor's bytes go to the open shard as it is added, so nothing is held once `add`
    returns: memory is one tensor, whatever the shard or model size. A shard's header is only
    known when it is full, so HEADER_BYTES are reserved at its front and the JSON header is
    written there, padded with spaces (which the safetensors format allows), when it closes."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self._file = None  # the shard being written
        self._entries: dict[str, dict] = {}  # its header
        self._header_bytes = 0  # its header's JSON size, about
        self._end = 0  # its data bytes
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.n_params = 0

    def add(self, name: str, array: mx.array) -> None:
        mx.eval(array)
        if array.dtype not in _SAFETENSORS:
            raise ConversionError(f"{name}: cannot store {array.dtype} in safetensors")
        data = np.ascontiguousarray(np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array))
        entry = {"dtype": _SAFETENSORS[array.dtype], "shape": list(array.shape),
                 "data_offsets": [self._end, self._end + data.nbytes]}
        size = len(json.dumps({name: entry})) + 8  # its share of the header, with a margin for offsets growing
        if self._file is not None and self._header_bytes + size > HEADER_BYTES - 256:
            self._flush()  # a shard of very many small tensors: its header space is full
            entry["data_offsets"] = [0, data.nbytes]
        if self._file is None:
            self._file = open(self.directory / f"shard-{len(self._shards):05d}.safetensors", "wb")
            self._file.seek(8 + HEADER_BYTES)
        self._file.write(memoryview(data).cast("B"))
        self._entries[name] = entry
        self._header_bytes += size
        self._end += data.nbytes
        self.total_bytes += data.nbytes
        if self._end >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._file is None:
            return
        header = json.dumps({"__metadata__": {"format": "mlx"}, **self._entries}, separators=(",", ":")).encode()
        self._file.seek(0)
        self._file.write(struct.pack("<Q", HEADER_BYTES) + header.ljust(HEADER_BYTES, b" "))
        self._file.close()
        self._shards.append((Path(self._file.name).name, list(self._entries)))
        self._file, self._entries, self._header_bytes, self._end = None, {}, 0, 0

    def close(self) -> list[Path]:
        """Flush, give shards their final names, write the index when there are several."""
        self._flush()
        n = len(self._shards)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp_name, names), name in zip(self._shards, final):
            (self.directory / tmp_name).rename(self.directory / name)
            weight_map.update({k: name for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.directory / f for f in final]


def write_config(directory: Path, config: dict) -> None:
    """config.json, with `query_pre_attn_scalar` an int where it is whole: transformers 5's Gemma3TextConfig
    refuses 256.0 (so mlx-lm could not read our conversions). Read back, it is the same config (and the
    same fingerprint: the loaded config holds it as a float either way)."""
    config = {k: dict(v) if k == "text_config" and isinstance(v, dict) else v for k, v in config.items()}
    for d in (config, config.get("text_config")):
        q = d.get("query_pre_attn_scalar") if isinstance(d, dict) else None
        if isinstance(q, float) and q.is_integer():
            d["query_pre_attn_scalar"] = int(q)
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
