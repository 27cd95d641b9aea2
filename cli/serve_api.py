"""The OpenAI schema: request bodies checked and turned into jobs, and the answers' JSON shapes.

Everything a request can get wrong is an `ApiError` with the status and the OpenAI error shape
(`{"error": {"message", "type", "param", "code"}}`). Parameters this server cannot honour are
refused (n > 1, tools, penalties, remote image URLs), never silently ignored. Images arrive only
as base64 `data:` URLs: this server never fetches a URL nor reads a file for a request.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time

from ..constrain import Constraint, ConstraintError
from ..prompt import MARKER
from ..settings import Sampling
from ..tools import ToolError, ToolUse, chat_messages
from .serve_queue import Job

IMAGE_PART = MARKER  # where an image part stood in a message's text


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                             503: "server_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_DEPTH = 64  # JSON nesting a request may have (a JSON schema in it included)
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(data: bytes):
    """A request body as JSON, or an ApiError saying why not: not UTF-8, not JSON, NaN or Infinity
    (not JSON either, though Python reads them), nested deeper than MAX_DEPTH, or a string with a
    lone surrogate (a `\\ud800` escape: valid JSON, not text a tokenizer can take)."""
    def finite(text: str) -> float:
        x = float(text)
        if not math.isfinite(x):
            raise ValueError(f"the number {text[:20]} is too large")
        return x

    def constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(data, parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise ApiError(400, f"the JSON nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {str(e)[:200]}", code="invalid_json") from None
    stack = [(body, 0)]  # iterative: nothing in a body can exhaust the interpreter's stack
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                raise ApiError(400, f"a string holds a lone surrogate (\\u{ord(_SURROGATE.search(v)[0]):04x}), "
                                    "which is not text: pair it or drop it", code="invalid_text")
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ApiError(400, f"the JSON nests deeper than {MAX_DEPTH} levels", code="invalid_json")
            for item in (v if isinstance(v, list) else (x for kv in v.items() for x in kv)):
                stack.append((item, depth + 1))
    return body


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _get(body: dict, key: str, kinds, default=None, check=None, what: str = ""):
    """body[key] if of the right JSON type (booleans are not numbers) and passing `check`."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
                 dict: "an object"}
        raise ApiError(400, f"{key}: expected {' or '.join(names[k] for k in kinds if k in names)}, "
                            f"got {type(v).__name__}", param=key, code="invalid_type")
    if check is not None and not check(v):
        raise _bad(key, f"must be {what} (got {v!r})")
    return v


NUM = (int, float)


def common(body: dict, model_names: tuple[str, ...]) -> dict:
    """The parameters shared by chat and text completions, checked: the Job's arguments, plus
    "stream", "include_usage" and "model" (the name to echo)."""
    model = _get(body, "model", (str,), model_names[0])
    if model not in model_names:
        raise ApiError(404, f"the model {model!r} is not served here; this server serves {model_names[0]!r}",
                       param="model", code="model_not_found")
    if _get(body, "n", (int,), 1) != 1:
        raise _bad("n", "only n=1 is supported (one choice per request)")
    if _get(body, "best_of", (int,), 1) != 1:
        raise _bad("best_of", "only best_of=1 is supported")
    for key in ("frequency_penalty", "presence_penalty"):
        if _get(body, key, NUM, 0) != 0:
            raise _bad(key, "not supported (use repetition_penalty)")
    if _get(body, "logit_bias", (dict,), {}):
        raise _bad("logit_bias", "not supported")
    if _get(body, "functions", (list,), []):
        raise _bad("functions", "the legacy functions API is not supported (use tools)")
    constraint = response_format(_get(body, "response_format", (dict,), {"type": "text"}))
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    stop = _get(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "a non-empty string or up to 4 of them")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    max_tokens = max_tokens or _get(body, "max_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    draw = {  # OpenAI's default temperature is 1, not Sampling's 0
        "temp": float(_get(body, "temperature", NUM, 1.0, lambda v: 0 <= v <= 2, "between 0 and 2")),
        "top_p": float(_get(body, "top_p", NUM, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
        "top_k": _get(body, "top_k", (int,), 0, lambda v: v >= 0, ">= 0"),
        "min_p": float(_get(body, "min_p", NUM, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")),
        "repetition_penalty": float(_get(body, "repetition_penalty", NUM, 1.0, lambda v: v > 0, "> 0")),
        "seed": _get(body, "seed", (int,), None),
    }
    if draw["seed"] is not None:
        draw["seed"] %= 1 << 64  # any integer is a seed (MLX's keys take unsigned 64-bit ones)
    settings = Sampling(**draw, stop=tuple(stops), constraint=constraint)
    return {"model": model, "stream": stream, "include_usage": bool(stream and options.get("include_usage")),
            "max_tokens": max_tokens, "settings": settings}


def response_format(fmt: dict):
    """OpenAI's response_format -> a Constraint (None for text). Whether it compiles is checked before
    the request is queued (serve.py), so a schema that cannot run is a 400 naming why, never run free."""
    kind = fmt.get("type", "text")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint.json_object()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise _bad("response_format", 'json_schema needs {"name": ..., "schema": {...}}')
            return Constraint.json_schema(spec["schema"])
        if kind == "regex" and isinstance(fmt.get("regex"), str):  # extensions (as vLLM's guided_regex/grammar)
            return Constraint.regex(fmt["regex"])
        if kind == "grammar" and isinstance(fmt.get("grammar"), str):  # Lark, or GBNF when it has ::=
            return Constraint.grammar(fmt["grammar"])
    except ConstraintError as e:
        raise _bad("response_format", str(e)) from None
    raise _bad("response_format", 'type must be "text", "json_object", "json_schema", or (extensions) "regex" '
                                  f'with "regex", "grammar" with "grammar" (got {kind!r:.40})')


def tool_use(body: dict):
    """tools / tool_choice / parallel_tool_calls -> (a ToolUse, the grammar its replies are held to),
    (None, None) without tools; anything that cannot run (a schema over the size bound included) a 400."""
    tools = body.get("tools")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise _bad("tool_choice", "needs tools")
        return None, None
    try:
        use = ToolUse.from_request(tools, body.get("tool_choice"), body.get("parallel_tool_calls"))
        return use, use.constraint()
    except (ToolError, ConstraintError) as e:
        raise ApiError(400, str(e), param="tools", code="invalid_value") from None


def _image(url: str) -> bytes:
    if not url.startswith("data:"):
        raise ApiError(400, "image_url: only data: URLs (base64) are accepted; this server never fetches "
                            "remote or local images", param="image_url", code="invalid_image_url")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise _bad("image_url", "a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image_url", "the data: URL is not valid base64") from None


def _content(message: dict, i: int, images: list[bytes]) -> str:
    """A message's text, with the image marker where each image part stood (images appended)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content: expected a string or an array of parts", param="messages")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
            url = part["image_url"]
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _bad("image_url", "expected {\"url\": \"data:...\"}")
            if message.get("role") != "user":
                raise ApiError(400, f"messages[{i}]: images go in user messages", param="messages")
            images.append(_image(url))
            text.append(IMAGE_PART)
        else:
            raise ApiError(400, f"messages[{i}].content: unsupported part {kind!r} (text and image_url are)",
                           param="messages")
    return "".join(text)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def join_turns(messages) -> list[dict]:
    """Gemma's turns alternate: consecutive messages of a role join (with a blank line), in linear time
    (a body of 100,000 one-word messages of a role must not take quadratic string copies)."""
    turns: list[tuple[str, list[str]]] = []
    for m in messages:
        if turns and turns[-1][0] == m["role"]:
            turns[-1][1].append(m["content"])
        else:
            turns.append((m["role"], [m["content"]]))
    return [{"role": role, "content": "\n\n".join(parts)} for role, parts in turns]


def chat_job(body: dict, model_names: tuple[str, ...], send, vision: bool) -> tuple[Job, dict]:
    opts = common(body, model_names)
    messages = _get(body, "messages", (list,), None)
    if not messages:
        raise ApiError(400, "messages: a non-empty array is required", param="messages", code="invalid_value")
    tools, held_to = tool_use(body)
    if tools is not None and opts["settings"].constraint is not None:
        raise _bad("response_format", "cannot be combined with tools (a call is already held to its schema)")
    images, texts = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (*ROLES, "tool"):
            raise ApiError(400, f"messages[{i}]: role must be one of system, developer, user, assistant, tool",
                           param="messages", code="invalid_value")
        texts.append({**m, "role": ROLES.get(m["role"], m["role"]), "content": _content(m, i, images)})
    try:
        texts = chat_messages(texts, tools)  # tools into the prompt; calls and results as plain turns
    except ToolError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    out = join_turns(texts)
    if images and not vision:
        raise ApiError(400, "this model cannot see images (a text-only Gemma 3)", param="messages",
                       code="images_not_supported")
    logprobs = None
    if _get(body, "logprobs", (bool,), False):
        logprobs = _get(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "between 0 and 20")
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "needs logprobs: true")
    job = Job(send, messages=out, images=images, max_tokens=opts["max_tokens"], settings=opts["settings"],
              logprobs=logprobs)
    if tools is not None:
        job.settings, opts["tools"] = job.settings.replace(constraint=held_to), tools
    return job, opts


def completion_job(body: dict, model_names: tuple[str, ...], send) -> tuple[Job, dict]:
    opts = common(body, model_names)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok = isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    if not ok:
        raise ApiError(400, "prompt: a non-empty string or array of token ids (one prompt per request)",
                       param="prompt", code="invalid_value")
    if _get(body, "echo", (bool,), False) or _get(body, "suffix", (str,), None):
        raise _bad("echo", "echo and suffix are not supported")
    logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "between 0 and 20")
    job = Job(send, prompt=prompt, max_tokens=opts["max_tokens"], settings=opts["settings"], logprobs=logprobs)
    return job, opts


# ---------------------------------------------------------------------- answers


def usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


class Shapes:
    """The JSON of one request's answers (chat or text completion, streamed or whole)."""

    def __init__(self, chat: bool, model: str, tokenizer, rid: str):
        self.chat, self.model, self.tokenizer, self.id = chat, model, tokenizer, rid
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": "gemma3-mlx"}

    def _token(self, tok: int, lp: float) -> dict:
        b = self.tokenizer.token_bytes(tok, skip_special=False)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    def logprobs(self, lps: list) -> dict:
        """lps: [(token, logprob, ((alt, logprob), ...)), ...] in the endpoint's logprobs shape."""
        if self.chat:
            return {"content": [{**self._token(t, lp), "top_logprobs": [self._token(a, alp) for a, alp in top]}
                                for t, lp, top in lps]}
        return {"tokens": [self._token(t, lp)["token"] for t, lp, _ in lps],
                "token_logprobs": [lp for _, lp, _ in lps],
                "top_logprobs": [{self._token(a, alp)["token"]: alp for a, alp in top} for _, _, top in lps]}

    def chunk(self, text: str | None, finish: str | None = None, lps=None, role: bool = False,
              include_usage: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if lps:
            choice["logprobs"] = self.logprobs(lps)
        out = {**self._base(True), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def calls_chunk(self, calls: list[dict], include_usage: bool = False) -> dict:
        """One chunk carrying every call whole (a call is parsed once its reply has ended)."""
        deltas = [{"index": i, "id": c["id"], "type": "function",
                   "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in enumerate(calls)]
        out = {**self._base(True), "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None,
                                                 "logprobs": None}]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: dict) -> dict:
        return {**self._base(True), "choices": [], "usage": usage(u)}

    def whole(self, text: str, finish: str, u: dict, lps=None, calls: list[dict] | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls]}
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if lps is not None:
            choice["logprobs"] = self.logprobs(lps)
        return {**self._base(False), "choices": [choice], "usage": usage(u)}
