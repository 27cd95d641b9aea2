"""`gemma3 serve` against `mlx_lm.server` on the same weights, in one run: aggregate decode tok/s and
time to first token at 1, 2, 4 and 8 concurrent streams.

    pip install mlx-lm            # the peer; not a dependency of gemma3-mlx
    python tests/benchmarks/serve.py --source /tmp/g270-f32          # the float32 270M (speed.py's --source)
    python tests/benchmarks/serve.py --levels 1,8 --tokens 32         # fewer, shorter runs

Both servers run as subprocesses on 127.0.0.1 with their defaults for batching (ours `--max-batch 8`;
mlx-lm `--decode-concurrency 32 --prompt-concurrency 8`); mlx-lm is started after `import gemma3_mlx`,
so both run MLX's CPU backend on the same OpenBLAS. Each stream is a streamed `/v1/completions`
request (raw text, greedy, `max_tokens` N) with its own 40-token-ish prompt, read as raw SSE by a
thread of this process. Per level: TTFT = mean over streams of request sent -> first text chunk;
aggregate tok/s = all streams' tokens / (first request sent -> last stream done), tokens counted
from the `usage` both servers return (`stream_options.include_usage`). This wall-clock figure is
tool-neutral: a server that streams text a word at a time (mlx-lm) is not credited for the tokens
it held back before its first chunk; prefill of the short prompts is included (about one or two
decode steps' worth). Also printed, as each tool streams it: decode tok/s = sum over streams of
(tokens - 1) / (latest last chunk - earliest first chunk).
Each server is warmed up at the level first, then the level runs `--rounds` times alternating which
server goes first; the best round of each is kept. Goal (issue 13): ours at 8 streams >= 4x ours at
1, and >= 1.0x mlx-lm at every level. Numbers are comparable only within one run (shared machine).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from speed import source_270m  # noqa: E402  (the same float32 270M directory as speed.py)

TOPICS = ["the sea", "a mountain village", "the first computers", "bread", "a long train journey", "winter birds",
          "an old library", "the moon landing", "rivers", "a market at dawn", "clocks", "the desert at night",
          "bees", "lighthouses", "a chess game", "rain in the city"]


def prompt(i: int) -> str:
    return (f"Here is a short essay about {TOPICS[i % len(TOPICS)]}, written for a school magazine by a "
            f"student who loves the subject and has thought about it for a long time. It begins:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.time() + 600
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                self.request(prompt(0), 2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{name} did not start")

    def request(self, text: str, tokens: int) -> dict:
        """One streamed completion: {"sent", "first", "last", "tokens"} (perf_counter seconds)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {"model": "default_model" if self.name == "mlx-lm" else None, "prompt": text, "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        c.request("POST", "/v1/completions", json.dumps({k: v for k, v in body.items() if v is not None}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {r.status}: {r.read()[:300]}")
        first = last = None
        n = chunks = 0
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
            if d.get("choices") and d["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
        c.close()
        return {"sent": sent, "first": first, "last": last, "done": time.perf_counter(), "tokens": n or chunks}

    def level(self, streams: int, tokens: int) -> dict:
        out = [None] * streams
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, self.request(prompt(i), tokens)))
                   for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        span = max(r["last"] for r in out) - min(r["first"] for r in out)
        wall = max(r["done"] for r in out) - min(r["sent"] for r in out)
        return {"tps": sum(r["tokens"] for r in out) / wall, "decode": sum(r["tokens"] - 1 for r in out) / span,
                "ttft": sum(r["first"] - r["sent"] for r in out) / streams,
                "tokens": sum(r["tokens"] for r in out)}

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="the float32 270M directory (made from the packaged GGUF when missing)")
    p.add_argument("--levels", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        src = source_270m(a.source, Path(tmp))
        ours_port, peer_port = free_port(), free_port()
        t0 = time.perf_counter()
        servers = [
            Server("gemma3-mlx", [sys.executable, "-m", "gemma3_mlx.cli.main", "serve", "-m", str(src),
                                  "--port", str(ours_port), "--max-batch", "8"], ours_port),
            Server("mlx-lm", [sys.executable, "-c", "import sys, gemma3_mlx; from mlx_lm.server import main; "
                              "sys.argv[0] = 'mlx_lm.server'; main()", "--model", str(src), "--port", str(peer_port),
                              "--log-level", "WARNING"], peer_port),
        ]
        print(f"both servers up in {time.perf_counter() - t0:.0f} s; {a.tokens} tokens per stream, "
              f"best of {a.rounds} rounds", flush=True)
        try:
            rows = []
            for n in levels:
                best = {}
                for s in servers:
                    s.level(n, 4)  # warm-up at this batch size
                for r in range(a.rounds):
                    for s in servers if r % 2 == 0 else servers[::-1]:
                        m = s.level(n, a.tokens)
                        if s.name not in best or m["tps"] > best[s.name]["tps"]:
                            best[s.name] = m
                ours, peer = best["gemma3-mlx"], best["mlx-lm"]
                rows.append((n, ours, peer))
                print(f"{n} streams: ours {ours['tps']:6.1f} tok/s (decode as streamed {ours['decode']:.1f}), TTFT "
                      f"{ours['ttft']:.2f} s | mlx-lm {peer['tps']:6.1f} tok/s (decode as streamed {peer['decode']:.1f}), "
                      f"TTFT {peer['ttft']:.2f} s | ratio {ours['tps'] / peer['tps']:.2f}x", flush=True)
        finally:
            for s in servers:
                s.close()
    print("\n| streams | gemma3 serve tok/s | TTFT s | mlx_lm.server tok/s | TTFT s | ours / mlx-lm |")
    print("|---|---|---|---|---|---|")
    for n, ours, peer in rows:
        print(f"| {n} | {ours['tps']:.1f} | {ours['ttft']:.2f} | {peer['tps']:.1f} | {peer['ttft']:.2f} | "
              f"{ours['tps'] / peer['tps']:.2f}x |")
    base = next((o["tps"] for n, o, _ in rows if n == 1), None)
    if base:
        print("ours, aggregate vs 1 stream: " + ", ".join(f"{n}: {o['tps'] / base:.1f}x" for n, o, _ in rows))


if __name__ == "__main__":
    main()
