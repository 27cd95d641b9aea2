"""Hostile input against `gemma3 serve`, on both the OpenAI and the Ollama routes: every bad request is
a 4xx naming the reason, none reaches a 500, and the server keeps serving.

The tiny model with the real tokenizer runs in this process (test_server.make_tiny) behind a recorder
of every response status, so the module ends by checking that no request, whatever it was, got a 5xx
other than the queue's 503. All traffic goes to 127.0.0.1.
"""

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

import gemma3_mlx
from test_server import free_port, make_tiny, wait_healthy


class Recorder:
    """An ASGI wrapper that notes the status of every response."""

    def __init__(self, app):
        self.app, self.statuses = app, []

    async def __call__(self, scope, receive, send):
        async def noted(message):
            if message["type"] == "http.response.start":
                self.statuses.append((scope.get("path"), message["status"]))
            await send(message)

        await self.app(scope, receive, noted)


class Server:
    def __init__(self, path):
        from gemma3_mlx.cli.serve import make_app
        from gemma3_mlx.cli.serve_worker import Worker

        self.model, self.tokenizer = gemma3_mlx.load(path)
        self.name = path.name
        self.worker = Worker(self.model, self.tokenizer, max_batch=4, cache_bytes=8 << 20, max_queue=4)
        self.worker.start()
        self.app = Recorder(make_app(self.worker, (self.name,), max_body=1 << 20))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", timeout_keep_alive=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.port)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()

    def send(self, path: str, body, method: str = "POST", headers=None, timeout: float = 60):
        """(status, parsed JSON) of one request; `body` bytes as they are, anything else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request(method, path, body=data if method == "POST" else None,
                  headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw

    def health_time(self) -> float:
        t0 = time.perf_counter()
        status, _ = self.send("/health", None, method="GET", timeout=5)
        assert status == 200
        return time.perf_counter() - t0


@pytest.fixture(scope="module")
def server(tokenizer_270m, tmp_path_factory):
    s = Server(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("hostile") / "tiny-chat"))
    yield s
    s.close()
    bad = [(path, status) for path, status in s.app.statuses if status >= 500 and status != 503]
    assert not bad, bad


def chat(content, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0, **kw}


def ollama_chat(content, **kw) -> dict:
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "stream": False,
            "options": {"num_predict": 2}, **kw}


def error_text(body) -> str:
    """The message of either error shape (OpenAI's {"error": {"message"}}, Ollama's {"error": "..."})."""
    e = body["error"]
    return e["message"] if isinstance(e, dict) else e


# ---------------------------------------------------------------------- the two cases from the issue


def test_a_lone_surrogate_is_a_400_naming_it(server):
    for path, body in (("/v1/chat/completions", chat("a \ud800 b")),
                       ("/v1/completions", {"prompt": "x\udfff", "max_tokens": 1}),
                       ("/v1/chat/completions", chat("hi", stop=["\ud800"])),
                       ("/v1/chat/completions", {**chat("hi"), "\udc00": 1})):  # in a key, too
        status, got = server.send(path, json.dumps(body).encode())  # json.dumps writes it as \ud800
        assert status == 400 and "lone surrogate" in error_text(got), (path, got)
    # a surrogate pair is one character (an emoji): served
    status, got = server.send("/v1/chat/completions", json.dumps(chat("smile \ud83d\ude00")).encode())
    assert status == 200 and got["usage"]["completion_tokens"] == 2


def test_a_100000_deep_array_is_a_400_naming_it(server):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, got = server.send("/v1/chat/completions", deep)
    assert status == 400 and "nests deeper than 64" in error_text(got)
    just = json.dumps(chat("hi", user=[[[[[[[[[[[]]]]]]]]]]])).encode()  # shallow nesting: other checks speak
    assert server.send("/v1/chat/completions", just)[0] == 200
    deep_schema = {"type": "object"}
    for _ in range(70):
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    status, got = server.send("/v1/chat/completions", chat("hi", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema}}))
    assert status == 400 and "nests deeper" in error_text(got)


# ---------------------------------------------------------------------- a dozen more


@pytest.mark.parametrize("body, words", [
    (chat(12), "messages[0].content"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    (chat("hi", temperature="warm"), "temperature"),
    (chat("hi", max_tokens=2.5), "max_tokens"),
    (chat("hi", max_tokens=True), "max_tokens"),
    (chat("hi", stream="yes"), "stream"),
    (chat("hi", stop={"a": 1}), "stop"),
    (chat("hi", seed="7"), "seed"),
    (chat("hi", top_p=-1), "top_p"),
    (chat("hi", max_tokens=10**30), "max_tokens"),  # huge numbers
    (chat("hi", temperature=1e308 * 10), "too large"),  # written 1e309: infinite as a float
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": ' + b"9" * 5000 + b"}",
     "malformed JSON"),  # past Python's 4300-digit limit for int()
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not JSON"),
    ({"prompt": [2, 10**12], "max_tokens": 1}, "token"),
    ({"prompt": [-1], "max_tokens": 1}, "prompt"),
    (b"\xff\xfe{}", "malformed JSON"),  # not UTF-8
    (b"", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_bad_values_are_400s_naming_the_field(server, body, words):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    data = body if isinstance(body, bytes) else json.dumps(body).replace("Infinity", "1e309").encode()
    status, got = server.send(path, data)
    assert status == 400, (status, got)
    assert words in error_text(got), got


def test_thirty_thousand_messages_of_one_role(server):
    """They join into one turn (in linear time: quadratic joining took 19 s for 80,000 on this machine,
    on the event loop) and the prompt is then too long for the context: a 400, on both APIs."""
    many = [{"role": "user", "content": "x"}] * 30_000
    for path, body in (("/v1/chat/completions", {"messages": many, "max_tokens": 1}),
                       ("/api/chat", {"model": "tiny-chat", "messages": many, "stream": False})):
        status, got = server.send(path, json.dumps(body, separators=(",", ":")).encode())
        assert status == 400 and "more than the model's context of 2048" in error_text(got), (path, got)
    from gemma3_mlx.cli.serve_api import join_turns

    assert join_turns([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]) == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]


def test_nul_bytes_and_control_characters_are_text(server):
    status, got = server.send("/v1/chat/completions", chat("a\x00b\x01c\x7f\u200b\ufeff"))
    assert status == 200 and got["usage"]["completion_tokens"] == 2
    status, got = server.send("/v1/completions", {"prompt": "\x00" * 50, "max_tokens": 1, "temperature": 0})
    assert status == 200 and got["usage"]["prompt_tokens"] >= 2
    status, got = server.send("/v1/chat/completions", chat("hi", model="tiny\x00chat"))
    assert status == 404


def test_a_lying_content_length_and_a_huge_one(server):
    status, got = server.send("/v1/chat/completions", b"{}", headers={"Content-Length": str(10**15)})
    assert status == 413
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 5000\r\n\r\n" + json.dumps(chat("hi")).encode())
    s.close()  # left halfway through its body
    assert server.health_time() < 1


def test_half_open_connections_leave_the_server_answering(server):
    socks = []
    try:
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall([b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
                       b"POST /api/chat HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mod",  # body never finished
                       b"GET /health HTT"][i % 3])
            socks.append(s)
        assert max(server.health_time() for _ in range(5)) < 0.5
        status, got = server.send("/v1/chat/completions", chat("still there?"))
        assert status == 200 and got["usage"]["completion_tokens"] == 2
    finally:
        for s in socks:
            s.close()


def test_clients_that_leave_mid_stream_free_their_rows(server):
    def leave_after(path: str, body: dict, lines: int):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        for _ in range(lines):
            r.readline()
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()

    before = server.worker.metrics.counters["cancelled"]
    threads = [threading.Thread(target=leave_after, args=(
        ("/v1/chat/completions", chat(f"Go on {i}.", max_tokens=1500, stream=True), 4) if i % 2 else
        ("/api/generate", {"model": "tiny-chat", "prompt": f"Go on {i}.", "options": {"num_predict": 1500}}, 2)))
        for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    end = time.time() + 10
    while server.worker.metrics.gauges["active_sequences"] or server.worker.queue.in_flight:
        assert time.time() < end, "rows were not freed"
        time.sleep(0.01)
    assert server.worker.metrics.counters["cancelled"] - before == 8
    assert server.worker.metrics.counters["generated_tokens"] < 8 * 1500
    status, got = server.send("/v1/chat/completions", chat("after them"))
    assert status == 200 and got["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------- the Ollama routes


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", ollama_chat("a \ud800 b"), 400, "lone surrogate"),
    ("/api/chat", b'{"model": "tiny-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "nests deeper"),
    ("/api/chat", ollama_chat("hi", options={"temperature": "hot"}), 400, "temperature"),
    ("/api/chat", ollama_chat("hi", options={"num_predict": 2.5e30}), 400, "num_predict"),
    ("/api/chat", ollama_chat("hi", options={"stop": [1, 2]}), 400, "stop"),
    ("/api/chat", ollama_chat("hi", options=[1]), 400, "options"),
    ("/api/chat", ollama_chat("hi", format=7), 400, "format"),
    ("/api/chat", ollama_chat(["hi"]), 400, "content"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x", "images": ["%%%"]}]}, 400,
     "base64"),
    ("/api/generate", {"model": "tiny-chat", "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404, "not found"),
    ("/api/generate", {"prompt": "hi"}, 400, "model is required"),
    ("/api/show", {"model": "tiny-chat\x00"}, 404, "not found"),
    ("/api/chat", b"{not json", 400, ""),
    ("/api/chat", b"", 400, ""),
])
def test_ollama_routes_refuse_in_ollamas_shape(server, path, body, status, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got_status, got = server.send(path, data)
    assert got_status == status, got
    assert isinstance(got["error"], str) and words in got["error"], got  # Ollama's shape: {"error": "..."}


def test_extreme_but_valid_values_are_served(server):
    for path, body in (
        ("/v1/chat/completions", chat("hi", temperature=2, top_k=10**18, seed=-(10**30), repetition_penalty=1e300,
                                      top_p=1e-300, min_p=0.999999)),
        ("/v1/completions", {"prompt": [2] * 3, "max_tokens": 2, "seed": 2**64 + 5, "stop": ["\x00", "\U0010ffff"]}),
        ("/api/chat", ollama_chat("hi", options={"num_predict": 2, "repeat_last_n": 10**18, "top_k": 10**18,
                                                 "repeat_penalty": 1e300, "seed": -(10**30),
                                                 "temperature": 1e300, "min_p": 0.999, "num_ctx": 10**12,
                                                 "num_thread": -5, "f16_kv": "not a bool but unknown"},
                                  keep_alive=-1)),
        ("/api/generate", {"model": "tiny-chat:latest", "prompt": "\x00" * 10, "stream": False,
                           "options": {"num_predict": 2, "stop": ["\ud83d\ude00"]}, "keep_alive": "5m"}),
    ):
        status, got = server.send(path, json.dumps(body).encode())
        assert status == 200, (path, got)
        usage = got.get("usage", {}).get("completion_tokens") if "usage" in got else got.get("eval_count")
        assert 1 <= usage <= 2, (path, got)
