"""Admission by memory in `gemma3 serve` (cli/serve_admission.py): requests reserve their worst-case KV,
wait when it does not fit, are refused when it never could; RSS stays within GEMMA3_MLX_MEMORY.

In-process: the tiny model with the real tokenizer (test_server.make_tiny) and a budget set by hand,
checked against the bytes of the engine's real cache arrays. As `gemma3 serve`: a model with a heavy
KV cache (16 KV heads of 256) under a small GEMMA3_MLX_MEMORY, its peak RSS read from /proc.
All traffic goes to 127.0.0.1.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import gemma3_mlx
from test_server import free_port, make_tiny, wait_healthy


class Jobs:
    """Jobs sent straight to a Worker, their answers kept."""

    def __init__(self, worker):
        self.worker, self.answers = worker, {}

    def submit(self, i, content: str, max_tokens=None) -> bool:
        from gemma3_mlx.cli.serve_worker import Job

        self.answers[i] = []
        job = Job(self.answers[i].append, messages=[{"role": "user", "content": content}], max_tokens=max_tokens)
        return self.worker.submit(job), job

    def end(self, i):
        return next((a for a in self.answers[i] if a[0] in ("done", "error")), None)

    def wait(self, ids, timeout=120):
        end = time.time() + timeout
        while any(self.end(i) is None for i in ids):
            assert time.time() < end, {i: self.answers[i][-1:] for i in ids}
            time.sleep(0.005)


@pytest.fixture(scope="module")
def tiny(tokenizer_270m, tmp_path_factory):
    from gemma3_mlx.cli.serve_worker import Worker

    path = make_tiny(tokenizer_270m, tmp_path_factory.mktemp("admission") / "tiny-chat")
    model, tokenizer = gemma3_mlx.load(path)
    worker = Worker(model, tokenizer, max_batch=4, cache_bytes=64 << 20, max_queue=8)
    worker.start()
    yield worker
    worker.stop()


@pytest.mark.slow  # hundreds of decode steps
def test_reservations_bound_the_real_cache_and_requests_wait_their_turn(tiny):
    a = tiny.admission
    ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me everything."}])
    a.budget = a.batch_bytes([len(ids) + 400])  # one such request at a time
    jobs = Jobs(tiny)
    for i in range(3):
        assert jobs.submit(i, "Tell me everything.", max_tokens=400)[0]
    seen, waited = [], 0
    end = time.time() + 120
    while any(jobs.end(i) is None for i in range(3)):
        e = tiny.engine
        if e.layers:  # the batch's real arrays, never more than what was reserved for them
            seen.append((sum(c.nbytes for c in e.layers), a.reserved))
        waited = max(waited, len(a.waiting))
        assert a.reserved <= a.budget and len(a.rows) <= 1
        assert time.time() < end
        time.sleep(0.001)
    assert [jobs.end(i)[:2] for i in range(3)] == [("done", "length")] * 3
    assert waited >= 1 and seen and all(used <= reserved for used, reserved in seen)
    assert a.reserved == 0 and not a.rows and not a.waiting and tiny.queue.in_flight == 0
    assert tiny.pool.bytes <= a.budget  # what the pool keeps fits beside nothing running


@pytest.mark.slow  # hundreds of decode steps
def test_past_the_context_is_a_400_naming_both_and_no_limit_gets_what_fits(tiny):
    a = tiny.admission
    jobs = Jobs(tiny)
    ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there."}])
    jobs.submit(0, "Hello there.", max_tokens=2048)
    jobs.wait([0])
    status, message = jobs.end(0)[1:]
    assert status == 400 and f"max_tokens is 2048 and the prompt has {len(ids)} tokens" in message
    assert "context of 2048" in message
    a.budget = a.batch_bytes([len(ids) + 300])  # room for 300 tokens of reply, not the context
    jobs.submit(1, "Hello there.")  # no max_tokens: what memory allows
    jobs.wait([1])
    done = jobs.end(1)
    fits = a._fitting(len(ids))
    assert done[:2] == ("done", "length") and 300 <= fits - len(ids) < 300 + 256
    assert done[2]["completion_tokens"] == fits - len(ids)
    jobs.submit(2, "Hello there.", max_tokens=1000)  # asked for more than could ever fit
    jobs.wait([2])
    assert jobs.end(2)[1] == 400 and f"ask for at most {fits - len(ids)} max_tokens" in jobs.end(2)[2]


def test_a_waiting_request_whose_client_leaves_is_dropped(tiny):
    a = tiny.admission
    ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Go on."}])
    a.budget = a.batch_bytes([len(ids) + 300])
    jobs = Jobs(tiny)
    before = dict(tiny.metrics.counters)
    jobs.submit(0, "Go on.", max_tokens=300)
    _, waiting = jobs.submit(1, "Go on.", max_tokens=300)
    end = time.time() + 30
    while not a.waiting:
        assert time.time() < end
        time.sleep(0.001)
    tiny.cancel(waiting)
    jobs.wait([0])
    time.sleep(0.05)
    assert jobs.answers[1] == [] and not a.waiting and tiny.queue.in_flight == 0
    assert tiny.metrics.counters["cancelled"] - before["cancelled"] == 1
    assert tiny.metrics.counters["requests"] - before["requests"] == 1  # it never reached the engine


# ---------------------------------------------------------------------- `gemma3 serve` under GEMMA3_MLX_MEMORY


def make_heavy(tokenizer_model, out):
    """tiny_v5's layers (2 global of 8) with 16 KV heads of 256: 64 KB of KV per token, 4 bytes each."""
    return make_tiny(tokenizer_model, out, intermediate_size=32, num_key_value_heads=16, num_attention_heads=16,
                     head_dim=256, max_position_embeddings=4096)


def _peak_rss(pid: int) -> int:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024


@pytest.mark.slow  # a server process and 16 long prompts
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's peak RSS from /proc")
def test_sixteen_long_requests_under_a_small_memory_complete_or_get_503(tokenizer_270m, tmp_path):
    from mlx.utils import tree_flatten

    from gemma3_mlx.cli.serve_admission import Admission, activations, buffer_cache
    from gemma3_mlx.loader import default_dtype
    from gemma3_mlx.memory import RUNTIME_BYTES

    path = make_heavy(tokenizer_270m, tmp_path / "heavy")
    model, tokenizer = gemma3_mlx.load(path)
    prompts = [f"{i}: " + "lorem ipsum dolor " * (300 + 5 * i) for i in range(16)]
    longest = max(len(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in prompts) + 4
    # memory for exactly two such requests at once beside the weights, the runtime and the activations
    arithmetic = Admission(model.config, 0, bytes_per_value=default_dtype().size)
    fixed = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + RUNTIME_BYTES + activations(model.config, 4096)
    memory = int((fixed + arithmetic.batch_bytes([longest] * 2) + (8 << 20)) / 0.9)
    assert buffer_cache(memory) == memory // 10
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_mlx.cli.main", "serve", "-m", str(path), "--port", str(port),
                             "--max-batch", "4", "--max-queue", "4", "--cache-gb", "1"],
                            env={**os.environ, "GEMMA3_MLX_MEMORY": str(memory)}, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc=proc, port=port)
        results = [None] * 16

        def one(i):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 4, "temperature": 0}
            c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            results[i] = (r.status, json.loads(r.read()))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        statuses = sorted(s for s, _ in results)
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 8, statuses  # 4 rows + 4 queued get in
        for status, body in results:
            assert status == 503 or body["choices"][0]["finish_reason"] == "length"
        peak = _peak_rss(proc.pid)
        assert peak <= memory, (peak >> 20, memory >> 20)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # still serving
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2}), {"Content-Type": "application/json"})
        assert c.getresponse().status == 200
        for _ in range(50):  # the gauges are measured once per model-thread turn, after the answers went out
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/metrics")
            m = dict(line.rsplit(" ", 1) for line in c.getresponse().read().decode().splitlines() if line[0] != "#")
            if float(m["gemma3_kv_reserved_bytes"]) == 0:
                break
            time.sleep(0.1)
        assert 0 < float(m["gemma3_kv_budget_bytes"]) <= memory and float(m["gemma3_kv_reserved_bytes"]) == 0
    finally:
        proc.terminate()
        proc.wait(10)
