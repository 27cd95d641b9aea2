"""Write an MLX model directory atomically, one shard at a time.

Everything goes into a temporary directory beside OUT that is renamed at the end; on any
failure or Ctrl-C it is removed, so a failed conversion leaves nothing behind. Tensors are
streamed in and flushed shard by shard, so memory stays near one shard, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .._atomic import make_temp_dir, output_problem, publish, write_marker
from ..errors import ConversionError

SHARD_BYTES = 2 << 30


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
    """Collects tensors and writes `model-0000i-of-0000n.safetensors` shards plus an index."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self._pending: dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.n_params = 0

    def add(self, name: str, array: mx.array) -> None:
        mx.eval(array)
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        mx.save_safetensors(str(self.directory / name), self._pending, metadata={"format": "mlx"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

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
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
