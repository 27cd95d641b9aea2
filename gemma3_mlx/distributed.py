"""Running one model across processes started by `mlx.launch`: the group, the checks that every rank
runs the same thing, and loading each rank's share (shard.py splits the model).

    group = distributed.init()                       # MLX_RANK / MLX_HOSTFILE from mlx.launch
    model, tokenizer = distributed.load(path, group, "tensor")   # or "pipeline"
    # then the usual Engine / generate / ChatSession, the same calls on every rank

A cluster that does not come up (a host down, a port taken, a rank never started) fails within
`timeout` seconds with one line instead of hanging: MLX's ring backend waits for its peers forever
while holding the interpreter, so a small watchdog process does the timing. Every rank must be
given the same inputs: `broadcast_text` sends rank 0's (a prompt, a chat message) to the others.
This module moves bytes only through mx.distributed; it opens no sockets of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import Gemma3Error
from .loader import load_config, load_model, load_tokenizer
from .memory import gb, machine_memory, needs
from .shard import Plan

TIMEOUT = 20.0  # seconds for the group to form: ssh and Python start-up on the other Macs included


class ClusterError(Gemma3Error):
    """The ranks did not come together, or do not agree on what to run."""


_WATCHDOG = """import os, select, signal, sys
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout)[0]:  # the pipe closes (or says ok) when the parent is through
    if message:
        sys.stderr.write(message + "\\n")
        sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


@contextmanager
def deadline(seconds: float, message: str):
    """Kill this process, printing `message` (one line), if the block is not over within `seconds`.
    For calls that block in C++ holding the interpreter, where no Python timer can fire."""
    dog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                           stdin=subprocess.PIPE)
    try:
        yield
    finally:
        dog.stdin.close()
        dog.wait()


def rank_from_env() -> int:
    try:
        return int(os.environ.get("MLX_RANK", "0"))
    except ValueError:
        return 0


def init(timeout: float = TIMEOUT) -> mx.distributed.Group:
    """The group of every rank (strict: a missing MLX_RANK/MLX_HOSTFILE is an error, not a group of one),
    with one round trip done, so every link is known to work. Raises ClusterError, or exits within
    `timeout` s with one line on rank 0's stderr when the peers never answer."""
    rank = rank_from_env()
    # Rank 0 speaks for the cluster; the others only if rank 0 did not bring them down first.
    message = (f"error: the cluster did not come up within {timeout:.0f} s: a host that is down or unreachable, "
               "a port in use, or a rank that was not started (check the hostfile)")
    with deadline(timeout if rank == 0 else timeout + 5, message if rank == 0 else ""):
        try:
            group = mx.distributed.init(strict=True)
            mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
        except RuntimeError as e:
            why = " ".join(str(e).split())
            hint = ("a port of the hostfile is in use on this host: choose others (mlx.launch --starting-port)"
                    if "error: 98" in why or "error: 48" in why else  # EADDRINUSE on Linux / macOS
                    "run under mlx.launch, or set MLX_RANK and MLX_HOSTFILE")
            raise ClusterError(f"cannot start the distributed group: {why} ({hint})") from None
    return group


def broadcast_text(text: str | None, group: mx.distributed.Group) -> str | None:
    """Rank 0's `text` (None included) on every rank; the other ranks pass anything."""
    data = text.encode() if group.rank() == 0 and text is not None else None
    n = mx.distributed.all_sum(mx.array([-1 if data is None else len(data)] if group.rank() == 0 else [0]), group=group)
    n = n.item()
    return None if n < 0 else _broadcast_bytes(data, n, group).decode()


def _broadcast_bytes(data: bytes | None, n: int, group: mx.distributed.Group) -> bytes:
    """Rank 0's `n` bytes on every rank (a sum where the others add zeros: uint8 cannot overflow)."""
    if n == 0:
        return b""
    mine = mx.array(np.frombuffer(data, np.uint8)) if group.rank() == 0 else mx.zeros((n,), mx.uint8)
    return np.array(mx.distributed.all_sum(mine, group=group), dtype=np.uint8).tobytes()


class Channel:
    """Messages from rank 0 to every rank, in lockstep with a decode loop that never waits on the host.

    Every rank calls `post` then `take` once per turn of its loop, in the same order as its steps.
    `post` queues only a small header (rank 0's message length) behind the step in flight, without
    reading it; `take`, a turn later, reads it when it has long been computed, so a loop with nothing
    to say costs one tiny all-reduce a turn and no stall. A message itself (rank 0's bytes) is sent
    when taken, which waits once for the step in flight."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self._header = None  # (1,) int32, lazy: the length rank 0 posted
        self._data = None

    def post(self, data: bytes | None) -> None:
        if self._header is not None:
            raise RuntimeError("post() twice without take()")
        n = len(data) if self.group.rank() == 0 and data else 0
        self._data = data if n else None
        self._header = mx.distributed.all_sum(mx.array([n], mx.int32), group=self.group)
        mx.async_eval(self._header)  # sent now, in step order on every rank

    def take(self) -> bytes | None:
        """Rank 0's bytes of the last `post` (None when it posted none, or nothing was posted)."""
        if self._header is None:
            return None
        n, self._header = self._header.item(), None
        data, self._data = self._data, None
        return _broadcast_bytes(data, n, self.group) if n else None


def gather(values: list[int], group: mx.distributed.Group) -> list[list[int]]:
    """Each rank's integer `values` (same length everywhere), on every rank: [rank][i]."""
    out = mx.distributed.all_gather(mx.array([[int(v) for v in values]], mx.int64), group=group)
    return out.tolist()


def _identity(path) -> tuple[str, str]:
    """(digest, label) of a model directory: its config and its tensor files' names and sizes.
    A rank that cannot read it reports its error as the label."""
    try:
        path = Path(path)
        load_config(path)
        h = hashlib.sha256((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest(), path.name
    except (Gemma3Error, OSError, ValueError) as e:
        return "error", " ".join(str(e).split())


def check_same(group: mx.distributed.Group, **things) -> None:
    """Raise ClusterError (the same on every rank) unless every rank has equal `things`: a model path
    (compared by identity), a command line. Values: JSON-able, ("path", p) for a model directory, or
    the exception this rank met finding it (reported by rank 0 as that rank's)."""
    rows = []
    for key, value in things.items():
        if isinstance(value, BaseException):  # this rank could not even find it
            digest, label = "error", " ".join(str(value).split())
        elif isinstance(value, tuple):
            digest, label = _identity(value[1])
        else:
            digest, label = hashlib.sha256(json.dumps(value).encode()).hexdigest(), str(value)
        raw = (digest[:16] + "|" + label).encode()[:256].ljust(256, b"\0")
        rows.append(np.frombuffer(raw, np.uint8))
    mine = mx.array(np.stack(rows).astype(np.int32))[None]  # (1, K, 256)
    every = np.array(mx.distributed.all_gather(mine, group=group)).astype(np.uint8)  # (N, K, 256)
    for k, key in enumerate(things):
        texts = [bytes(every[r, k]).rstrip(b"\0").decode(errors="replace") for r in range(every.shape[0])]
        errors = [(r, t.split("|", 1)[1]) for r, t in enumerate(texts) if t.startswith("error|")]
        if errors:
            r, why = errors[0]
            raise ClusterError(f"rank {r}: {why}")
        digests = [t.split("|", 1)[0] for t in texts]
        for r, d in enumerate(digests):
            if d != digests[0]:
                a, b = texts[0].split("|", 1)[1], texts[r].split("|", 1)[1]
                raise ClusterError(f"the ranks do not agree on the {key}: rank 0 has {a[:80]}, rank {r} has {b[:80]}")


def load(path, group: mx.distributed.Group, parallel: str, dtype=None, dequantize=None, weights=None):
    """(model, tokenizer) for this rank: `parallel` "tensor" or "pipeline"; each rank reads only its own
    tensors (and slices) of the directory. `weights`: pipeline shares per rank (default: each rank's memory).
    Raises ClusterError on every rank, before anything is read, when a rank lacks the memory for its share."""
    config = load_config(Path(path))
    if parallel == "pipeline" and weights is None:
        weights = [row[0] for row in gather([machine_memory() // 2**20], group)]
    plan = Plan(config, group, parallel, weights)
    check_fits(path, plan, dtype, dequantize)
    model = load_model(path, dtype, dequantize, config=config, plan=plan)
    return model, load_tokenizer(path, config=config)


def check_fits(path, plan: Plan, dtype=None, dequantize=None) -> None:
    """Raise ClusterError (the same on every rank: a collective) unless every rank has the memory to
    load its share of the model: the whole model need not fit one machine, each share must fit its own."""
    n = needs(path, dtype=dtype, dequantize=dequantize, config=plan.config, plan=plan)
    rows = gather([n.to_load, machine_memory()], plan.group)
    short = [(r, need, have) for r, (need, have) in enumerate(rows) if need > have]
    if short:
        r, need, have = short[0]
        alone = needs(path, dtype=dtype, dequantize=dequantize, config=plan.config).to_load
        raise ClusterError(f"rank {r} needs about {gb(need)} to load its share of the model ({gb(alone)} in all) "
                           f"and has {gb(have)}: add ranks, give the larger machines more "
                           f"layers (--parallel pipeline), or choose a more quantized model")


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


__all__ = ["Channel", "ClusterError", "TIMEOUT", "broadcast_text", "check_fits", "check_same", "deadline", "gather", "init",
           "load", "parameter_bytes", "rank_from_env"]
