"""`gemma3 serve`: an OpenAI-compatible HTTP server over one model (Starlette on uvicorn), with Ollama's
API on the same port (serve_ollama_routes.py).

The event loop only parses, checks and streams; one model thread (serve_worker.Worker) does every
MLX call. Each request waits on an asyncio queue the worker fills from its thread. A disconnect is
heard directly (a task awaiting the ASGI `http.disconnect`, streaming or not) and cancels the
request in the engine at its next step. Safe by default: loopback only unless an API key is set
(Bearer, compared in constant time), no CORS unless asked, bodies capped, a bounded queue (503),
requests admitted by memory (serve_admission.py), JSON that is not text refused (serve_api.parse_json).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ..constrain import ConstraintError
from ..tools import Held
from . import serve_api as api
from . import serve_ollama_routes
from . import serve_page
from .serve_metrics import prometheus
from .serve_start import SPECULATIVE
from .serve_worker import Worker

MAX_BODY = 25 << 20  # bytes: a few images as base64


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(e: api.ApiError, request: Request | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith("/api/"):  # Ollama's shape
        return JSONResponse({"error": e.message}, status_code=e.status)
    return JSONResponse(e.body(), status_code=e.status)


def _speculative(body: dict) -> str | None:
    """The request's "speculative" extension field: "draft", "prompt-lookup" or "off" (None: the server's)."""
    how = body.get("speculative")
    if how is not None and how not in SPECULATIVE:
        raise api.ApiError(400, f"speculative: one of {', '.join(SPECULATIVE)} (got {how!r})", param="speculative")
    return how


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class _EventStream:
    """A streamed ASGI response (server-sent events, or Ollama's NDJSON) that cancels its job if the
    client goes away."""

    def __init__(self, chunks, media_type: bytes = b"text/event-stream; charset=utf-8"):
        self.chunks, self.media_type = chunks, media_type

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", self.media_type), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote: the generator's finally cancels the job
            pass
        finally:
            await self.chunks.aclose()


class _Request:
    """One admitted job: its answers from the worker, and the watch for a disconnect."""

    def __init__(self, worker: Worker, request: Request):
        self.worker, self.request = worker, request
        self.answers: asyncio.Queue = asyncio.Queue()  # what the worker sends this request
        self.loop = asyncio.get_running_loop()
        self.watch = None
        self.job = None
        self.finished = False

    def send(self, item) -> None:  # called from the model thread
        try:
            self.loop.call_soon_threadsafe(self.answers.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    def start(self, job) -> None:
        self.job = job
        if not self.worker.submit(job):
            raise api.ApiError(503, f"the server is busy ({self.worker.queue.max_in_flight} requests in flight); "
                                    "try again shortly", code="queue_full")
        self.watch = asyncio.ensure_future(self._disconnected())

    async def admit(self, job):
        """Check the job's constraint off the event loop (a ConstraintError is the caller's 400, naming
        why), queue the job, and return the worker's first word: ("accepted", n), ("error", status,
        message), or None when the client has gone."""
        if job.settings.constraint is not None:
            await asyncio.to_thread(job.settings.constraint.check, self.worker.engine.vocabulary)
        self.start(job)
        try:
            return await self.next()  # "accepted", or an error found while building the prompt
        except BaseException:
            self.close()
            raise

    async def next(self):
        """The worker's next item; None once the client disconnected (the job is then cancelled)."""
        getter = asyncio.ensure_future(self.answers.get())
        await asyncio.wait({getter, self.watch}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            item = getter.result()
            if item[0] in ("done", "error"):
                self.finished = True
            return item
        getter.cancel()
        self.close()
        return None

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.worker.cancel(self.job)
        if self.watch is not None:
            self.watch.cancel()


def make_app(worker: Worker, model_names: tuple[str, ...], *, api_key: str | None = None,
             cors: list[str] | None = None, max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app over a started Worker. `model_names`: the served name first, then its aliases."""
    tokenizer, vision = worker.tokenizer, worker.model.config.vision is not None
    bank = getattr(worker.model, "adapters", None)  # LoRA adapters on the same base, each served by its name
    adapters = tuple(bank.names) if bank is not None else ()
    served = model_names + adapters
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the key is not guessed byte by byte
            raise api.ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            raise api.ApiError(413, f"the request body is over {max_body} bytes", code="body_too_large")
        data, n = [], 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > max_body:
                    raise api.ApiError(413, f"the request body is over {max_body} bytes", code="body_too_large")
                data.append(chunk)
        except ClientDisconnect:  # it left halfway through its body: nobody will read the answer
            raise api.ApiError(400, "the client went away before sending the whole body") from None
        body = api.parse_json(b"".join(data))
        if not isinstance(body, dict):
            raise api.ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def complete(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request)
        req = _Request(worker, request)
        if chat:
            job, opts = api.chat_job(body, served, req.send, vision)
        else:
            job, opts = api.completion_job(body, served, req.send)
        job.adapter = opts["model"] if opts["model"] in adapters else None  # a model choice: not a sampling setting
        job.speculative = _speculative(body)
        shapes = api.Shapes(chat, opts["model"], tokenizer, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex)
        try:
            first = await req.admit(job)
        except ConstraintError as e:
            param = "tools" if opts.get("tools") else "response_format"
            raise api.ApiError(400, f"{param}: {e}", param=param, code="invalid_value") from None
        if first is None:
            return PlainTextResponse("", status_code=499)
        if first[0] == "error":
            req.close()
            return _error(api.ApiError(first[1], first[2]))
        if opts["stream"]:
            return _EventStream(_stream(req, shapes, opts["include_usage"], opts.get("tools")))
        return await _whole(req, shapes, opts.get("tools"))

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "gemma3-mlx"}

    async def list_models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in (model_names[0],) + adapters]})

    async def get_model(request: Request):
        authorize(request)
        name = request.path_params["name"]
        if name not in served:
            raise api.ApiError(404, f"the model {name!r} is not served here; this server serves {model_names[0]!r}",
                               code="model_not_found")
        return JSONResponse(model_card(name))

    async def health(request: Request):
        return JSONResponse({"status": "stopped" if worker.stopped.is_set() else "ok", "model": model_names[0]})

    async def metrics(request: Request):
        authorize(request)
        return PlainTextResponse(prometheus(worker.metrics), media_type="text/plain; version=0.0.4")

    async def api_error(request, e: api.ApiError):
        return _error(e, request)

    async def http_error(request, e: HTTPException):
        what = "no such route" if e.status_code == 404 else e.detail
        return _error(api.ApiError(e.status_code, f"{request.method} {request.url.path}: {what}",
                                   code="not_found" if e.status_code == 404 else None), request)

    async def server_error(request, e: Exception):
        return _error(api.ApiError(500, f"internal error: {type(e).__name__}: {e}"), request)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", list_models), Route("/v1/models/{name:path}", get_model),
              Route("/health", health), Route("/metrics", metrics)]
    routes += serve_page.routes(worker, model_names, api_key)  # the chat page at /
    routes += serve_ollama_routes.routes(worker, model_names, read_json=read_json, authorize=authorize,
                                         open_request=lambda request: _Request(worker, request), stream=_EventStream)
    middleware = [Middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                             allow_headers=["authorization", "content-type"])] if cors else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={api.ApiError: api_error, HTTPException: http_error, Exception: server_error})


async def _stream(req: _Request, shapes: api.Shapes, include_usage: bool, tools=None):
    """SSE chunks. With tools, a reply that opens with { or [ is held until it ends, then sent as
    tool_calls if it parses as calls (else as text); a reply that opens otherwise streams as text."""
    held = Held(tools)
    try:
        yield _sse(shapes.chunk(None, role=True, include_usage=include_usage)) if shapes.chat else b""
        while True:
            item = await req.next()
            if item is None:
                return
            if item[0] == "delta":
                if tools is None:
                    yield _sse(shapes.chunk(item[1], lps=item[2], include_usage=include_usage))
                elif text := held.add(item[1]):
                    yield _sse(shapes.chunk(text, include_usage=include_usage))
            elif item[0] == "done":
                finish = item[1]
                text, calls = held.end()
                if calls:
                    yield _sse(shapes.calls_chunk(calls, include_usage))
                    finish = "tool_calls"
                elif text:
                    yield _sse(shapes.chunk(text, include_usage=include_usage))
                yield _sse(shapes.chunk(None, finish, include_usage=include_usage))
                if include_usage:
                    yield _sse(shapes.usage_chunk(item[2]))
                yield _sse(b"[DONE]")
                return
            elif item[0] == "error":
                yield _sse(api.ApiError(item[1], item[2]).body())
                return
    finally:
        req.close()


async def _whole(req: _Request, shapes: api.Shapes, tools=None):
    text, lps = [], [] if req.job.logprobs is not None else None
    try:
        while True:
            item = await req.next()
            if item is None:
                return PlainTextResponse("", status_code=499)  # nobody is listening
            if item[0] == "delta":
                text.append(item[1])
                if lps is not None and item[2]:
                    lps += item[2]
            elif item[0] == "done":
                calls = tools.parse("".join(text)) if tools is not None else None
                return JSONResponse(shapes.whole("".join(text), item[1], item[2], lps, calls))
            elif item[0] == "error":
                return _error(api.ApiError(item[1], item[2]))
    finally:
        req.close()


def page_url(host: str, sock: socket.socket) -> str:
    """The chat page's address for a browser on this machine (a wildcard host is reached by loopback)."""
    port = sock.getsockname()[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads: a port in use is one error line at once."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model, tokenizer, model_names: tuple[str, ...], *, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, cors: list[str] | None = None, max_batch: int = 8, cache_gb: float = 2.0,
          kv_bits: int | None = None, max_queue: int = 64, max_body: int = MAX_BODY, log_level: str = "warning",
          sock: socket.socket | None = None, on_ready=None, group=None, draft_model=None,
          speculative: str = "off") -> None:
    """Serve until interrupted (blocks). Refuses a non-loopback host without an API key. `sock`: a socket
    from `bind` (else one is bound to host:port here). `group`: the model is split across these ranks
    (this is rank 0; every other rank runs `follow` with the same settings)."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} listens beyond this machine: give --api-key too (or use 127.0.0.1)")
    sock = sock or bind(host, port)
    worker = _worker(model, tokenizer, group, max_batch=max_batch, cache_gb=cache_gb, kv_bits=kv_bits,
                     max_queue=max_queue, draft_model=draft_model, speculative=speculative)
    worker.start()
    app = make_app(worker, model_names, api_key=api_key, cors=cors, max_body=max_body)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                           timeout_graceful_shutdown=2))
    if on_ready is not None:
        _notify_when_started(server, on_ready)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()


def follow(model, tokenizer, group, *, max_batch: int = 8, cache_gb: float = 2.0, kv_bits: int | None = None,
           max_queue: int = 64) -> None:
    """A rank other than 0 of a split server: run rank 0's requests in step with it until it stops (blocks).
    The settings must be rank 0's (the command lines are checked to be the same)."""
    _worker(model, tokenizer, group, max_batch=max_batch, cache_gb=cache_gb, kv_bits=kv_bits,
            max_queue=max_queue).follow()


def _worker(model, tokenizer, group, *, max_batch: int, cache_gb: float, kv_bits: int | None, max_queue: int,
            draft_model=None, speculative: str = "off") -> Worker:
    return Worker(model, tokenizer, max_batch=max_batch, cache_bytes=int(cache_gb * 2**30), kv_bits=kv_bits,
                  max_queue=max_queue, group=group, draft_model=draft_model, speculative=speculative)


def _notify_when_started(server: uvicorn.Server, on_ready) -> None:
    import threading
    import time

    def wait():
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            on_ready()

    threading.Thread(target=wait, daemon=True).start()
