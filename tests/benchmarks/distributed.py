"""Tokens per second and bytes communicated per token with 1, 2 and 4 local ranks (ring backend on
127.0.0.1), tensor and pipeline parallel.

    python tests/benchmarks/distributed.py [--model DIR] [--tokens 16] [--ranks 1,2,4]

Each configuration runs under `mlx.launch --backend ring -n N` (this file is also the worker).
Bytes are measured on the ring's own TCP connections (Linux `ss`: bytes sent by each rank's sockets,
between a 1-token and an N-token generation of the same prompt, divided by the extra tokens) and
compared with shard.traffic()'s count on paper. This machine has 2 cores: with more ranks than
cores, MLX's ring backend spins while it waits, so speeds here only show that it runs; the bytes
and the collective counts are what carries over to two or four Macs (README, "Across several Macs").
Measured here 2026-12-06 (270M float32, --tokens 8, mlx 0.32.4, 2 cores at load 10-16): 1 rank 1.34 tok/s;
2 ranks tensor 0.70 tok/s and 620.6 KB sent per token per rank (619.0 on paper), pipeline 0.53 tok/s and
2.6 KB (2.6); 4 ranks tensor 0.16 tok/s and 935.7 KB (928.5), pipeline 0.28 tok/s and 2.6 KB (2.6). The
runs took 28 s, 46 s, 30 s, 102 s and 80 s. With 4 ranks on 2 busy cores the tensor cluster may not come
up within the default 20 s: set GEMMA3_MLX_CLUSTER_TIMEOUT=180.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def ring_bytes_sent() -> int:
    """Bytes this process's ring sockets sent (from MLX_HOSTFILE's ports; 0 where `ss` is missing)."""
    hosts = os.environ.get("MLX_HOSTFILE")
    if not hosts:
        return 0
    ports = {int(a.rsplit(":", 1)[1]) for node in json.loads(Path(hosts).read_text()) for a in node}
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout
    except OSError:
        return 0
    total, lines = 0, out.splitlines()
    for i, line in enumerate(lines):  # a socket's line, then its tcp_info line
        m = re.match(r"\S+\s+\d+\s+\d+\s+\S+:(\d+)\s+\S+:(\d+)", line.strip())
        if m and f"pid={os.getpid()}," in line and ({int(m.group(1)), int(m.group(2))} & ports):
            info = lines[i + 1] if i + 1 < len(lines) else ""
            sent = re.search(r"bytes_sent:(\d+)", info) or re.search(r"bytes_acked:(\d+)", info)
            total += int(sent.group(1)) if sent else 0
    return total


def worker(args) -> None:
    import gemma3_mlx  # noqa: F401
    import mlx.core as mx

    from gemma3_mlx import distributed
    from gemma3_mlx.generate import stream_generate
    from gemma3_mlx.loader import load

    group = distributed.init() if args.ranks > 1 else None
    if group is None:
        model, tok = load(args.model, dtype="float32")
    else:
        model, tok = distributed.load(args.model, group, args.mode, dtype="float32")
    prompt = "The history of the city of Rome begins"

    def run(n):
        before = ring_bytes_sent()
        for r in stream_generate(model, tok, prompt, max_tokens=n, stop_ids=()):
            pass
        mx.synchronize()
        return ring_bytes_sent() - before, r

    run(2)  # warm up
    one, _ = run(1)
    many, r = run(args.tokens)
    sent = distributed.gather([(many - one) // (args.tokens - 1)], group) if group else [[0]]
    if group is None or group.rank() == 0:
        print(json.dumps({"tps": r.generation_tps, "sent_per_token": [s[0] for s in sent]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path.home() / ".cache/gemma3-mlx/models/gemma-3-270m"))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", default="tensor")
    p.add_argument("--n", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        args.ranks = args.n
        return worker(args)

    import gemma3_mlx  # noqa: F401
    from gemma3_mlx.loader import load_config
    from gemma3_mlx.shard import traffic

    cfg = load_config(Path(args.model)).text
    print(f"{Path(args.model).name}: {args.tokens} tokens, float32 on the CPU, ring backend on 127.0.0.1")
    print(f"{'ranks':>5} {'mode':9} {'tok/s':>7} {'sent/token/rank (measured)':>27} {'(on paper)':>11} {'collectives':>11}")
    for n in [int(x) for x in args.ranks.split(",")]:
        for mode in (["tensor", "pipeline"] if n > 1 else ["one"]):
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--tokens", str(args.tokens),
                   "--mode", mode, "--n", str(n)]
            if n > 1:
                cmd = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", str(n), "--"] + cmd
            t = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            if not rows:
                print(f"{n:>5} {mode:9} failed: {out.stderr.strip()[-300:]}")
                continue
            r = rows[0]
            paper, ops = traffic(cfg, mode, n, value_bytes=4)
            measured = max(r["sent_per_token"]) if r["sent_per_token"] else 0
            print(f"{n:>5} {mode:9} {r['tps']:7.2f} {measured / 1e3:>24.1f} KB {paper / 1e3:>8.1f} KB {ops:>11}"
                  f"   ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
