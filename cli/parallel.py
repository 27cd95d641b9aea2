"""`--parallel tensor|pipeline`: a command run by every rank that `mlx.launch` starts.

    mlx.launch --hostfile hosts.json -- gemma3 generate -m gemma-3-27b-it-4bit --parallel tensor "Hello"

Every rank runs the same command and the same steps (gemma3_mlx/distributed.py, shard.py); rank 0
owns the terminal: the other ranks write nothing, and take their inputs (a prompt read from stdin,
chat messages) from rank 0. What the user sees is what one process prints.
"""

from __future__ import annotations

import os
import sys

from .. import distributed
from ..errors import Gemma3Error
from .ui import fail, note, status

MODES = ("tensor", "pipeline")


def wants_parallel(argv: list[str]) -> bool:
    return any(a == "--parallel" or a.startswith("--parallel=") for a in argv)


def quiet_other_ranks(argv: list[str]) -> None:
    """Before anything is printed: under --parallel, ranks other than 0 write to /dev/null (a usage
    error, a warning or the output would otherwise show once per rank). Rank 0 reports their errors."""
    if wants_parallel(argv) and distributed.rank_from_env() != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def open_parallel(model, parallel: str, resolve_model, dtype=None, speculating: bool = False, announce: bool = False):
    """(group, path, model, tokenizer) of this rank: the group formed (or one line within the timeout),
    every rank checked to have the same model and command line, then this rank's share loaded.
    `announce`: say "loading ..." as the command does alone (chat)."""
    if parallel not in MODES:
        fail(f"--parallel must be tensor or pipeline (got {parallel})")
    if speculating:
        fail("--parallel does not combine with speculative decoding (--draft-model, --prompt-lookup)")
    try:  # GEMMA3_MLX_CLUSTER_TIMEOUT: seconds for the ranks to meet (default distributed.TIMEOUT)
        group = distributed.init(float(os.environ.get("GEMMA3_MLX_CLUSTER_TIMEOUT", distributed.TIMEOUT)))
    except distributed.ClusterError as e:
        fail(str(e))
    try:
        path, found = resolve_model(model), None
    except (Gemma3Error, ValueError, OSError) as e:  # e.g. not on this machine: rank 0 says which rank
        path, found = None, e
    try:
        distributed.check_same(group, model=found if found else ("path", path), command=sys.argv[1:])
    except distributed.ClusterError as e:
        fail(str(e))
    if announce:
        note(f"loading {path.name} ...", dim=True)
    with status(f"loading {path.name} on {group.size()} ranks ({parallel} parallel) ..."):
        try:
            model_obj, tokenizer = distributed.load(path, group, parallel, dtype=dtype)
        except (Gemma3Error, ValueError, OSError) as e:
            fail(f"{path.name}: {' '.join(str(e).split())}")
    return group, path, model_obj, tokenizer


def shared_stdin(group) -> str:
    """Standard input, read by rank 0 and sent to every rank (alone: read here)."""
    if group is None:
        return sys.stdin.read()
    return distributed.broadcast_text(sys.stdin.read() if group.rank() == 0 else None, group)


def read_on_rank0(read, group):
    """A reader for the chat loop: rank 0 reads (`read(prompt, more)`), every rank gets the message;
    end of input ends every rank."""

    def shared(prompt: str, more: str) -> str:
        text = None
        if group.rank() == 0:
            try:
                text = read(prompt, more)
            except EOFError:
                text = None
        text = distributed.broadcast_text(text, group)
        if text is None:
            raise EOFError
        return text

    return shared


def report_ranks(group, model_obj, kv_bytes: int) -> None:
    """Each rank's parameter and KV-cache bytes (a collective: every rank calls it; rank 0 prints)."""
    for r, (params, kv) in enumerate(distributed.gather([distributed.parameter_bytes(model_obj), kv_bytes], group)):
        note(f"rank {r}: parameters {params / 1e6:.1f} MB, KV cache {kv / 1e6:.2f} MB", dim=True)
