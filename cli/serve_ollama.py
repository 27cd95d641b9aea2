"""The Ollama API on the server's port: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Bodies are checked as Ollama checks them and become the worker's Jobs; answers take Ollama's shapes
(NDJSON lines while streaming, its default; one object with "stream": false). Errors are Ollama's
`{"error": "..."}` with its status codes (serve.py renders every ApiError under /api/ that way).

Options map onto settings.Sampling, the one owner of sampling defaults: an option left out takes this
server's default (greedy), not Ollama's (temperature 0.8). As in Ollama, an unknown option is ignored
and a known one of the wrong type is a 400. Unlike Ollama, a sampler this server does not have
(typical_p, presence_penalty, frequency_penalty) is a 400 unless at its neutral value: never silently
ignored. Without effect: `keep_alive` (the model stays loaded while the server runs), the runner's
options (num_gpu, num_thread, num_batch, use_mmap, ...) and `num_ctx` (type-checked; every request
has the model's whole context). Refused: `template` (the model's own chat template is always used;
`raw: true` takes a prompt as is), `context` (deprecated by Ollama: send messages to /api/chat),
`suffix`, `tools` and `think: true` (Gemma 3 neither calls tools here nor thinks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import time
from datetime import datetime, timezone

import mlx.core as mx
from mlx.utils import tree_flatten
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..constrain import Constraint, ConstraintError
from ..memory import config_tensors
from ..settings import Sampling
from .serve_api import IMAGE_PART, ROLES, ApiError
from .serve_worker import Job

VERSION = "0.12.0"  # the Ollama API version this follows (clients check it for features)
NDJSON = b"application/x-ndjson"
INT = ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu", "main_gpu",
       "num_thread", "draft_num_predict")
FLOAT = ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty")
NEUTRAL = {"typical_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}  # samplers this server lacks
WHOLE_CONTEXT = 1 << 20  # tokens: more than any Gemma 3 context
TO_SAMPLING = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "repeat_penalty": "repetition_penalty", "repeat_last_n": "repetition_context"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _option(key: str, v):
    """One known option's value, checked for Ollama's type (JSON numbers are floats to Go: an integral
    float is an integer)."""
    if key in INT:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f'option "{key}" must be of type integer')
    elif key in FLOAT:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(f'option "{key}" must be of type float32')
        v = float(v)
    elif key == "stop":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _bad('option "stop" must be of an array of strings')
    elif key == "use_mmap" and not isinstance(v, bool):
        raise _bad(f'option "{key}" must be of type boolean')
    return v


def sampling(options) -> tuple[Sampling, int | None]:
    """Ollama's `options` as (Sampling, max_tokens); max_tokens None: up to the context (num_predict
    left out or <= 0, Ollama's "no limit")."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("options: expected an object")
    known = {k: _option(k, v) for k, v in options.items() if v is not None and (k in INT or k in FLOAT
                                                                                 or k in ("stop", "use_mmap"))}
    for key, neutral in NEUTRAL.items():
        if key in known and known[key] != neutral:
            raise _bad(f'option "{key}" is not supported by this server (leave it out, or use repeat_penalty)')
    settings = {TO_SAMPLING[k]: v for k, v in known.items() if k in TO_SAMPLING}
    settings["top_k"] = max(settings.get("top_k", 0), 0)  # Ollama: <= 0 is off
    last_n = settings.pop("repetition_context", None)  # Ollama: 0 is no penalty, -1 the whole context
    if last_n == 0:
        settings["repetition_penalty"] = 1.0
    elif last_n is not None:  # more than any context is the whole context (and stays a 32-bit slice)
        settings["repetition_context"] = WHOLE_CONTEXT if last_n < 0 else min(last_n, WHOLE_CONTEXT)
    if "seed" in known and known["seed"] >= 0:  # Ollama: -1 is a random seed
        settings["seed"] = known["seed"] % (1 << 64)
    if known.get("stop"):
        settings["stop"] = tuple(known["stop"])
    max_tokens = known.get("num_predict", -1)
    max_tokens = max_tokens if max_tokens > 0 else None
    if max_tokens is not None:
        settings["max_tokens"] = max_tokens
    try:
        return Sampling(**settings), max_tokens
    except ValueError as e:
        raise _bad(str(e)) from None


def constraint(fmt) -> Constraint | None:
    """Ollama's `format`: "json" is any JSON object, an object is a JSON Schema, "" or null is free text.
    (Whether a schema compiles is checked before the request is queued: `routes`.)"""
    if fmt is None or fmt == "":
        return None
    try:
        if fmt == "json":
            return Constraint.json_object()
        if isinstance(fmt, dict):
            return Constraint.json_schema(fmt)
    except ConstraintError as e:
        raise _bad(f"format: {e}") from None
    raise _bad('format: expected "json" or a JSON schema object')


def _images(value, where: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise _bad(f"{where}: expected an array of base64 strings")
    try:
        return [base64.b64decode(i, validate=True) for i in value]
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: an image is not valid base64 (send the file's bytes as base64, no data: prefix)") \
            from None


def _text(body: dict, key: str) -> str:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(f"{key}: expected a string")
    return v or ""


def _common(body: dict) -> tuple[Sampling, int | None, bool]:
    """(sampling, max_tokens, stream) after the checks /api/chat and /api/generate share."""
    if body.get("think") not in (None, False):
        raise _bad(f'"{body.get("model")}" does not support thinking')
    if body.get("tools"):
        raise _bad("tools: tool calls are not supported by this server")
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise _bad("stream: expected a boolean")
    s, max_tokens = sampling(body.get("options"))
    return s.replace(constraint=constraint(body.get("format"))), max_tokens, stream


def _job(send, s: Sampling, max_tokens: int | None, **kw) -> Job:
    """The worker's Job for these settings: the one place that knows how a Job carries them."""
    draw = dict(zip(("temp", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_context"), s.draw()))
    return Job(send, max_tokens=max_tokens, sampling={**draw, "seed": s.seed}, stops=list(s.stop),
               constraint=s.constraint, **kw)


def chat_job(body: dict, send, vision: bool) -> tuple[Job | None, bool]:
    """(job, stream); job None for a chat with no messages (Ollama's way to load a model)."""
    s, max_tokens, stream = _common(body)
    messages = body.get("messages")
    if messages is None or messages == []:
        return None, stream
    if not isinstance(messages, list):
        raise _bad("messages: expected an array")
    images, out = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]: expected an object")
        if m.get("role") not in ROLES or m["role"] == "developer":
            raise _bad(f"messages[{i}].role: {m.get('role')!r} is not one of system, user, assistant")
        if not isinstance(m.get("content", ""), str):
            raise _bad(f"messages[{i}].content: expected a string")
        if m.get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls: tool calls are not supported by this server")
        these = _images(m.get("images"), f"messages[{i}].images")
        if these and m["role"] != "user":
            raise _bad(f"messages[{i}]: images go in user messages")
        images += these
        text = IMAGE_PART * len(these) + (m.get("content") or "")  # Ollama puts a message's images first
        if out and out[-1]["role"] == m["role"]:  # Gemma's turns alternate: consecutive messages of a role join
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": m["role"], "content": text})
    if images and not vision:
        raise _bad("this model cannot see images (a text-only Gemma 3)")
    return _job(send, s, max_tokens, messages=out, images=images), stream


def generate_job(body: dict, send, vision: bool) -> tuple[Job | None, bool]:
    """(job, stream); job None for an empty prompt without images (Ollama's way to load a model)."""
    s, max_tokens, stream = _common(body)
    prompt, system = _text(body, "prompt"), _text(body, "system")
    if _text(body, "template"):
        raise _bad("template: not supported: this server always applies the model's own chat template "
                   "(use raw: true to send a prompt already in Gemma's format)")
    if body.get("context"):
        raise _bad("context: not supported (deprecated by Ollama): send the conversation to /api/chat")
    if _text(body, "suffix"):
        raise _bad("suffix: not supported (Gemma 3 has no fill-in-the-middle)")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise _bad("raw: expected a boolean")
    images = _images(body.get("images"), "images")
    if images and not vision:
        raise _bad("this model cannot see images (a text-only Gemma 3)")
    if not prompt and not images:
        return None, stream
    if raw:
        if system or images:
            raise _bad("raw mode does not support template, system, or context" if system else
                       "raw mode does not take images (send them to /api/chat or without raw)")
        return _job(send, s, max_tokens, prompt=prompt), stream
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": IMAGE_PART * len(images) + prompt})
    return _job(send, s, max_tokens, messages=messages, images=images), stream


# ---------------------------------------------------------------------- answers


class Shape:
    """The JSON of one /api/chat or /api/generate answer, with Ollama's durations (nanoseconds)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.t0 = self.t_accepted = self.t_first = time.perf_counter_ns()

    def accepted(self) -> None:
        self.t_accepted = self.t_first = time.perf_counter_ns()

    def _base(self, text: str, done: bool) -> dict:
        out = {"model": self.model, "created_at": _now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = done
        return out

    def chunk(self, text: str) -> dict:
        if self.t_first == self.t_accepted:
            self.t_first = time.perf_counter_ns()
        return self._base(text, False)

    def final(self, finish: str, usage: dict, text: str = "") -> dict:
        now = time.perf_counter_ns()
        return {**self._base(text, True), "done_reason": finish, "total_duration": now - self.t0,
                "load_duration": self.t_accepted - self.t0, "prompt_eval_count": usage["prompt_tokens"],
                "prompt_eval_duration": self.t_first - self.t_accepted, "eval_count": usage["completion_tokens"],
                "eval_duration": now - self.t_first}

    def loaded(self, unload: bool) -> dict:
        return {**self._base("", True), "done_reason": "unload" if unload else "load"}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


async def _lines(req, shape: Shape):
    try:
        while True:
            item = await req.next()
            if item is None:
                return
            if item[0] == "delta":
                if item[1]:
                    yield _line(shape.chunk(item[1]))
            elif item[0] == "done":
                yield _line(shape.final(item[1], item[2]))
                return
            elif item[0] == "error":
                yield _line({"error": item[2]})
                return
    finally:
        req.close()


async def _whole(req, shape: Shape):
    text = []
    try:
        while True:
            item = await req.next()
            if item is None:
                return Response(status_code=499)  # nobody is listening
            if item[0] == "delta":
                shape.chunk(item[1])
                text.append(item[1])
            elif item[0] == "done":
                return JSONResponse(shape.final(item[1], item[2], "".join(text)))
            elif item[0] == "error":
                return JSONResponse({"error": item[2]}, status_code=item[1])
    finally:
        req.close()


# ---------------------------------------------------------------------- the model's description


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def describe(model) -> dict:
    """What /api/tags, /api/show and /api/ps say of the served model (computed once)."""
    config, t = model.config, model.config.text
    params = sum(math.prod(shape) for _, shape in config_tensors(config))
    weights = [v for _, v in tree_flatten(model.parameters())]
    size = sum(v.nbytes for v in weights)
    q = config.quantization
    dtype = next((v.dtype for v in weights if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    level = f"Q{q.get('bits', 4)}" if q else {mx.bfloat16: "BF16", mx.float16: "F16"}.get(dtype, "F32")
    details = {"parent_model": "", "format": "safetensors", "family": "gemma3", "families": ["gemma3"],
               "parameter_size": _size(params), "quantization_level": level}
    info = {"general.architecture": "gemma3", "general.parameter_count": params,
            "gemma3.context_length": t.max_position_embeddings, "gemma3.embedding_length": t.hidden_size,
            "gemma3.block_count": t.num_hidden_layers, "gemma3.feed_forward_length": t.intermediate_size,
            "gemma3.attention.head_count": t.num_attention_heads,
            "gemma3.attention.head_count_kv": t.num_key_value_heads, "gemma3.attention.key_length": t.head_dim,
            "gemma3.attention.sliding_window": t.sliding_window, "gemma3.vocab_size": t.vocab_size}
    return {"size": size, "details": details, "model_info": info, "context": t.max_position_embeddings,
            "capabilities": ["completion"] + (["vision"] if config.vision is not None else [])}


TEMPLATE = ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")  # a system message opens the first user turn


def routes(worker, model_names: tuple[str, ...], *, read_json, authorize, open_request, stream) -> list[Route]:
    """The /api routes. From serve.make_app: `read_json(request)`, `authorize(request)`,
    `open_request(request)` (a serve._Request), `stream(chunks, media_type)` (an ASGI response)."""
    about = describe(worker.model)
    vision = worker.model.config.vision is not None
    served = model_names[0] if ":" in model_names[0] else f"{model_names[0]}:latest"
    digest = hashlib.sha256(f"{served}:{about['size']}".encode()).hexdigest()
    bank = getattr(worker.model, "adapters", None)  # LoRA adapters on the same base, each a model of its own name
    adapters = tuple(bank.names) if bank is not None else ()
    started = _now()

    def check_model(body: dict) -> str:
        name = body.get("model") or body.get("name")
        if not name:
            raise _bad("model is required")
        if not isinstance(name, str):
            raise _bad("model: expected a string")
        if name.removesuffix(":latest") in adapters:
            return name
        if name not in model_names and name.removesuffix(":latest") not in model_names and name != served:
            raise ApiError(404, f"model '{name}' not found")
        return name

    def adapter_of(name: str) -> str | None:
        return name.removesuffix(":latest") if name.removesuffix(":latest") in adapters else None

    async def answer(request, chat: bool):
        authorize(request)
        body = await read_json(request)
        shape = Shape(chat, check_model(body))
        req = open_request(request)
        job, streamed = (chat_job if chat else generate_job)(body, req.send, vision)
        if job is None:
            return JSONResponse(shape.loaded(body.get("keep_alive") in (0, "0", "0s", "0m")))
        job.adapter = adapter_of(shape.model)
        if job.constraint is not None:  # compiled off the event loop: a 400 naming why, before it is queued
            try:
                await asyncio.to_thread(job.constraint.check, worker.engine.vocabulary)
            except ConstraintError as e:
                raise _bad(f"format: {e}") from None
        req.start(job)  # a full queue: a 503
        try:
            first = await req.next()  # "accepted", or an error found while building the prompt
        except BaseException:
            req.close()
            raise
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            req.close()
            raise ApiError(first[1], first[2])
        shape.accepted()
        if streamed:
            return stream(_lines(req, shape), NDJSON)
        return await _whole(req, shape)

    async def chat(request):
        return await answer(request, chat=True)

    async def generate(request):
        return await answer(request, chat=False)

    def card() -> dict:
        return {"name": served, "model": served, "size": about["size"], "digest": digest, "details": about["details"]}

    async def tags(request):
        authorize(request)
        named = [{**card(), "name": f"{a}:latest", "model": f"{a}:latest"} for a in adapters]
        return JSONResponse({"models": [{**c, "modified_at": started} for c in [card(), *named]]})

    async def show(request):
        authorize(request)
        check_model(await read_json(request))
        defaults = Sampling()
        parameters = "\n".join(f"{k:<30} {getattr(defaults, v)}" for k, v in TO_SAMPLING.items())
        return JSONResponse({"modelfile": f"# served by gemma3-mlx\nFROM {model_names[0]}\n", "parameters": parameters,
                             "template": TEMPLATE, "details": about["details"], "model_info": about["model_info"],
                             "capabilities": about["capabilities"], "modified_at": started})

    async def ps(request):
        authorize(request)
        gpu = mx.default_device() != mx.cpu
        return JSONResponse({"models": [{**card(), "expires_at": "2318-01-01T00:00:00Z",
                                         "size_vram": about["size"] if gpu else 0, "context_length": about["context"]}]})

    async def version(request):
        return JSONResponse({"version": VERSION})

    return [Route("/api/chat", chat, methods=["POST"]), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]), Route("/api/show", show, methods=["POST"]),
            Route("/api/ps", ps, methods=["GET"]), Route("/api/version", version, methods=["GET"])]
