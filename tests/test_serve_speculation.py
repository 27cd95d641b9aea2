"""Speculative decoding in `gemma3 serve`: `--draft-model`, `--speculative`, and a request's own
"speculative" field. Greedy text must equal plain decoding token for token, with requests running
concurrently and replies going past the sliding window; /metrics shows the drafts and acceptance.

One `gemma3 serve` subprocess on a tiny random model (the real tokenizer, a 32-token window) that
also drafts for itself (a second copy), so most guesses hold and speculation really runs."""

import http.client
import json
import re
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from gemma3_mlx.cli.main import app
from test_server import free_port, make_tiny, wait_healthy

PROMPTS = [
    "Count with me: one two three four five six seven, one two three four five six seven, one two three",
    "Repeat after me: the red fox jumps over the fence. The red fox jumps over the fence. The red fox",
    "A list of colours: red, green, blue, yellow, red, green, blue, yellow, red, green, blue, yellow, red,",
]


class Served:
    def __init__(self, path, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "gemma3_mlx.cli.main", "serve", "-m", str(path), "--port",
                                      str(self.port), *args], stderr=subprocess.PIPE, text=True)
        wait_healthy(self.port, self.proc)

    def post(self, body: dict) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())

    def together(self, speculative: str | None, max_tokens: int = 48) -> list[str]:
        out = [None] * len(PROMPTS)

        def one(i):
            body = {"prompt": PROMPTS[i], "max_tokens": max_tokens, "temperature": 0}
            if speculative is not None:
                body["speculative"] = speculative
            status, r = self.post(body)
            assert status == 200, r
            out[i] = (r["choices"][0]["text"], r["usage"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def metrics(self) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^gemma3_(\w+) (\S+)$", text, re.M)}

    def close(self):
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture(scope="module")
def tiny_dir(tokenizer_270m, tmp_path_factory):
    return make_tiny(tokenizer_270m, tmp_path_factory.mktemp("spec") / "tiny-spec")


@pytest.mark.slow  # two server processes
def test_serve_with_a_draft_model_and_prompt_lookup_equals_plain_past_the_window(tiny_dir):
    s = Served(tiny_dir, "--draft-model", str(tiny_dir))  # the default: speculate with the draft model
    try:
        plain = s.together("off")
        m0 = s.metrics()
        assert m0["speculative_requests_total"] == 0 and m0["draft_tokens_total"] == 0
        drafted = s.together(None)
        m1 = s.metrics()
        looked_up = s.together("prompt-lookup")
        m2 = s.metrics()
        status, err = s.post({"prompt": "x", "max_tokens": 2, "speculative": "sometimes"})
    finally:
        s.close()
    window = 32
    for text, usage in plain:
        assert usage["prompt_tokens"] + usage["completion_tokens"] > 2 * window and usage["completion_tokens"] == 48
    assert [t for t, _ in drafted] == [t for t, _ in plain]
    assert [t for t, _ in looked_up] == [t for t, _ in plain]
    assert m1["speculative_requests_total"] == 3 and m2["speculative_requests_total"] == 6
    assert m1["draft_tokens_total"] > 0
    # the draft is the model itself: nearly every guess holds (exact greedy: all but float ties)
    assert m1["draft_accepted_tokens_total"] >= 0.9 * m1["draft_tokens_total"]
    assert m2["draft_tokens_total"] > m1["draft_tokens_total"]  # prompt lookup proposed too
    assert status == 400 and "speculative" in err["error"]["message"]


def test_serve_speculative_flags_are_checked_before_loading():
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--speculative", "draft", "--port", "0"])
    assert r.exit_code != 0 and "--speculative draft needs --draft-model" in r.output
    r = runner.invoke(app, ["serve", "--speculative", "often", "--port", "0"])
    assert r.exit_code != 0 and "--speculative must be draft, prompt-lookup or off" in r.output


def test_speculating_rows_are_checked_in_one_target_pass_and_equal_plain(monkeypatch):
    """The engine's rounds for several speculating rows: one target pass checks all their guesses
    (prefill.feed_rows), rows of different lengths and k, past many windows; greedy equals plain."""
    import gemma3_mlx.engine as engine_mod
    from gemma3_mlx.engine import Engine
    from gemma3_mlx.speculate import DraftModel, PromptLookup, Speculation
    from test_engine import alone, prompts_for, tiny_model

    target, other = tiny_model(8, seed=9), tiny_model(8, seed=10)
    prompts = prompts_for(target, [19, 40, 7, 33], seed=5)
    monkeypatch.setattr(Speculation, "paying", lambda self: True)  # keep every row speculating
    passes = []
    real = engine_mod.feed_rows
    monkeypatch.setattr(engine_mod, "feed_rows", lambda *a: passes.append(len(a[1])) or real(*a))
    engine = Engine(target, max_batch=4)
    drafts = [DraftModel(target), DraftModel(other), PromptLookup(), DraftModel(other)]
    uids = {engine.submit(p, max_tokens=120, stop_ids=(), draft=d, draft_tokens=k): i
            for i, (p, d, k) in enumerate(zip(prompts, drafts, [4, 2, 3, 8]))}
    got = {i: [] for i in uids.values()}
    while engine.has_work:
        for e in engine.step():
            got[uids[e.uid]].append(e.token)
    assert max(passes) == 4 and len(passes) > 20
    for i, p in enumerate(prompts):
        assert got[i] == alone(target, p, 120), i
