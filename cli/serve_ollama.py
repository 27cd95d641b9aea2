"""The Ollama API's schema: /api/chat and /api/generate bodies checked and turned into Jobs, and the
answers' shapes (NDJSON lines while streaming, its default; one object with "stream": false). The
routes themselves, and what /api/tags, /api/show and /api/ps say, are in serve_ollama_routes.py.
Errors are Ollama's `{"error": "..."}` with its status codes (serve.py renders an ApiError under
/api/ that way).

Options map onto settings.Sampling, the one owner of sampling defaults: an option left out takes this
server's default (greedy), not Ollama's (temperature 0.8). As in Ollama, an unknown option is ignored
and a known one of the wrong type is a 400. Unlike Ollama, a sampler this server does not have
(typical_p, presence_penalty, frequency_penalty) is a 400 unless at its neutral value: never silently
ignored. Without effect: `keep_alive` (the model stays loaded while the server runs), the runner's
options (num_gpu, num_thread, num_batch, use_mmap, ...). `num_ctx` below the model's context holds
the prompt and the reply within it (a longer prompt is a 400, where Ollama cuts its start).
Refused: `template` (the model's own chat template is always used; `raw: true` takes a prompt as
is), `context` (deprecated by Ollama: send messages to /api/chat), `suffix`, `tools` on /api/generate
and `think: true` (Gemma 3 does not think).

Tools on /api/chat (tools.py, as for the OpenAI routes; Ollama has no tool_choice: "auto", several
calls at once allowed): a reply is text or calls, held to the tools' schemas; calls come back as
`message.tool_calls` `[{"function": {"name", "arguments": {...}}}]` (arguments an object, as Ollama
sends them). History: an assistant message's `tool_calls` (arguments an object) and `role: "tool"`
results, each answering the earliest unanswered call of its `tool_name` (or the earliest unanswered
call when it names none).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import datetime, timezone

from ..constrain import Constraint, ConstraintError
from ..settings import Sampling
from ..tools import ToolError, ToolUse, chat_messages
from .serve_api import IMAGE_PART, ROLES, ApiError, join_turns
from .serve_queue import Job

VERSION = "0.12.0"  # the Ollama API version this follows (clients check it for features)
NDJSON = b"application/x-ndjson"
INT = ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu", "main_gpu",
       "num_thread", "draft_num_predict")
FLOAT = ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty")
NEUTRAL = {"typical_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}  # samplers this server lacks
WHOLE_CONTEXT = 1 << 20  # tokens: more than any Gemma 3 context
TO_SAMPLING = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
               "repeat_penalty": "repetition_penalty", "repeat_last_n": "repetition_context"}


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def refuse(message: str) -> ApiError:
    return ApiError(400, message)


def _option(key: str, v):
    """One known option's value, checked for Ollama's type (JSON numbers are floats to Go: an integral
    float is an integer)."""
    if key in INT:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise refuse(f'option "{key}" must be of type integer')
    elif key in FLOAT:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise refuse(f'option "{key}" must be of type float32')
        v = float(v)
    elif key == "stop":
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise refuse('option "stop" must be of an array of strings')
    elif key == "use_mmap" and not isinstance(v, bool):
        raise refuse(f'option "{key}" must be of type boolean')
    return v


def sampling(options) -> tuple[Sampling, int | None]:
    """Ollama's `options` as (Sampling, max_tokens); max_tokens None: up to the context (num_predict
    left out or <= 0, Ollama's "no limit")."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise refuse("options: expected an object")
    known = {k: _option(k, v) for k, v in options.items() if v is not None and (k in INT or k in FLOAT
                                                                                 or k in ("stop", "use_mmap"))}
    for key, neutral in NEUTRAL.items():
        if key in known and known[key] != neutral:
            raise refuse(f'option "{key}" is not supported by this server (leave it out, or use repeat_penalty)')
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
        raise refuse(str(e)) from None


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
        raise refuse(f"format: {e}") from None
    raise refuse('format: expected "json" or a JSON schema object')


def _images(value, where: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise refuse(f"{where}: expected an array of base64 strings")
    try:
        return [base64.b64decode(i, validate=True) for i in value]
    except (binascii.Error, ValueError):
        raise refuse(f"{where}: an image is not valid base64 (send the file's bytes as base64, no data: prefix)") \
            from None


def _text(body: dict, key: str) -> str:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise refuse(f"{key}: expected a string")
    return v or ""


def _common(body: dict) -> tuple[Sampling, dict, bool]:
    """(sampling, limits, stream) after the checks /api/chat and /api/generate share. `limits`: the Job's
    max_tokens (num_predict) and context (num_ctx: prompt and reply within it; refused past it, where
    Ollama would cut the prompt's start)."""
    if body.get("think") not in (None, False):
        raise refuse(f'"{body.get("model")}" does not support thinking')
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise refuse("stream: expected a boolean")
    s, max_tokens = sampling(body.get("options"))
    num_ctx = body["options"].get("num_ctx") if isinstance(body.get("options"), dict) else None
    limits = {"max_tokens": max_tokens, "context": _option("num_ctx", num_ctx) if num_ctx is not None else None}
    if limits["context"] is not None and limits["context"] <= 0:
        limits["context"] = None  # Ollama: the default
    return s.replace(constraint=constraint(body.get("format"))), limits, stream


def _job(send, s: Sampling, limits: dict, **kw) -> Job:
    """The worker's Job for these settings."""
    return Job(send, settings=s, **limits, **kw)


def chat_job(body: dict, send, vision: bool) -> tuple[Job | None, bool, ToolUse | None]:
    """(job, stream, tools); job None for a chat with no messages (Ollama's way to load a model)."""
    s, limits, stream = _common(body)
    use = None
    if body.get("tools"):
        try:
            use = ToolUse.from_request(body["tools"])
            held_to = use.constraint()
        except (ToolError, ConstraintError) as e:
            raise refuse(str(e) if str(e).startswith("tools") else f"tools: {e}") from None
        if s.constraint is not None:
            raise refuse("format: cannot be combined with tools (a call is already held to its schema)")
        s = s.replace(constraint=held_to)
    messages = body.get("messages")
    if messages is None or messages == []:
        return None, stream, use
    if not isinstance(messages, list):
        raise refuse("messages: expected an array")
    images, out, open_calls = [], [], []  # open_calls: (id, name) of calls no result has answered yet
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise refuse(f"messages[{i}]: expected an object")
        if m.get("role") not in (*ROLES, "tool") or m["role"] == "developer":
            raise refuse(f"messages[{i}].role: {m.get('role')!r} is not one of system, user, assistant, tool")
        if not isinstance(m.get("content", ""), str):
            raise refuse(f"messages[{i}].content: expected a string")
        these = _images(m.get("images"), f"messages[{i}].images")
        if these and m["role"] != "user":
            raise refuse(f"messages[{i}]: images go in user messages")
        images += these
        # Ollama puts a message's images before its text
        turn = {"role": m["role"], "content": IMAGE_PART * len(these) + (m.get("content") or "")}
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise refuse(f"messages[{i}].tool_calls: only an assistant message makes calls")
            turn["tool_calls"] = _calls(m["tool_calls"], i, open_calls)
        elif m["role"] == "tool":
            turn["tool_call_id"] = _answers(m, i, open_calls)
        out.append(turn)
    if images and not vision:
        raise refuse("this model cannot see images (a text-only Gemma 3)")
    try:
        out = chat_messages(out, use)  # the tools into the prompt; calls and results as plain turns
    except ToolError as e:
        raise refuse(str(e)) from None
    return _job(send, s, limits, messages=join_turns(out), images=images), stream, use


def _calls(calls, i: int, open_calls: list) -> list[dict]:
    """An assistant message's Ollama `tool_calls` in the OpenAI shape tools.chat_messages reads."""
    if not isinstance(calls, list):
        raise refuse(f"messages[{i}].tool_calls: expected an array")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", {}), dict)):
            raise refuse(f"messages[{i}].tool_calls[{j}]: expected {{function: {{name, arguments: {{...}}}}}}")
        cid = f"call_{i}_{j}"
        open_calls.append((cid, fn["name"]))
        out.append({"id": cid, "type": "function", "function": {
            "name": fn["name"], "arguments": json.dumps(fn.get("arguments", {}), ensure_ascii=False)}})
    return out


def _answers(m: dict, i: int, open_calls: list) -> str:
    """The id of the call a `role: "tool"` message answers (see the module's docstring)."""
    name = m.get("tool_name") or m.get("name")
    for k, (cid, called) in enumerate(open_calls):
        if name is None or called == name:
            del open_calls[k]
            return cid
    raise refuse(f"messages[{i}]: a tool result" + (f" of {name!r}" if name else "") +
                 ", but no earlier assistant message made such a call")


def generate_job(body: dict, send, vision: bool) -> tuple[Job | None, bool, None]:
    """(job, stream, None); job None for an empty prompt without images (Ollama's way to load a model)."""
    if body.get("tools"):
        raise refuse("tools: /api/generate takes no tools (send them with messages to /api/chat)")
    s, limits, stream = _common(body)
    prompt, system = _text(body, "prompt"), _text(body, "system")
    if _text(body, "template"):
        raise refuse("template: not supported: this server always applies the model's own chat template "
                   "(use raw: true to send a prompt already in Gemma's format)")
    if body.get("context"):
        raise refuse("context: not supported (deprecated by Ollama): send the conversation to /api/chat")
    if _text(body, "suffix"):
        raise refuse("suffix: not supported (Gemma 3 has no fill-in-the-middle)")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise refuse("raw: expected a boolean")
    images = _images(body.get("images"), "images")
    if images and not vision:
        raise refuse("this model cannot see images (a text-only Gemma 3)")
    if not prompt and not images:
        return None, stream, None
    if raw:
        if system or images:
            raise refuse("raw mode does not support template, system, or context" if system else
                       "raw mode does not take images (send them to /api/chat or without raw)")
        return _job(send, s, limits, prompt=prompt), stream, None
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": IMAGE_PART * len(images) + prompt})
    return _job(send, s, limits, messages=messages, images=images), stream, None


# ---------------------------------------------------------------------- answers


class Shape:
    """The JSON of one /api/chat or /api/generate answer, with Ollama's durations (nanoseconds)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.t0 = self.t_accepted = self.t_first = time.perf_counter_ns()

    def accepted(self) -> None:
        self.t_accepted = self.t_first = time.perf_counter_ns()

    def _base(self, text: str, done: bool, calls: list[dict] | None = None) -> dict:
        out = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:  # tools.parse's calls; Ollama's arguments are an object
                out["message"]["tool_calls"] = [{"function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                                                for c in calls]
        else:
            out["response"] = text
        out["done"] = done
        return out

    def chunk(self, text: str, calls: list[dict] | None = None) -> dict:
        if self.t_first == self.t_accepted:
            self.t_first = time.perf_counter_ns()
        return self._base(text, False, calls)

    def final(self, finish: str, usage: dict, text: str = "", calls: list[dict] | None = None) -> dict:
        now = time.perf_counter_ns()
        return {**self._base(text, True, calls), "done_reason": finish, "total_duration": now - self.t0,
                "load_duration": self.t_accepted - self.t0, "prompt_eval_count": usage["prompt_tokens"],
                "prompt_eval_duration": self.t_first - self.t_accepted, "eval_count": usage["completion_tokens"],
                "eval_duration": now - self.t_first}

    def loaded(self, unload: bool) -> dict:
        return {**self._base("", True), "done_reason": "unload" if unload else "load"}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"
