"""The Ollama API's routes on the server's port: /api/chat, /api/generate, /api/tags, /api/show,
/api/ps, /api/version. serve_ollama.py checks the bodies and shapes the answers; here the jobs are
queued and answered (streamed as NDJSON or whole), and the served model is described as Ollama's
clients expect it (details, model_info, a digest).
"""

from __future__ import annotations

import hashlib
import math

import mlx.core as mx
from mlx.utils import tree_flatten
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..constrain import ConstraintError
from ..memory import config_tensors
from ..settings import Sampling
from ..tools import Held
from .serve_api import ApiError
from .serve_ollama import NDJSON, TO_SAMPLING, VERSION, Shape, chat_job, generate_job, line, refuse, timestamp


async def _lines(req, shape: Shape, tools=None):
    held = Held(tools)  # under tools, a reply that may be a call waits for its end
    try:
        while True:
            item = await req.next()
            if item is None:
                return
            if item[0] == "delta":
                if text := held.add(item[1]):
                    yield line(shape.chunk(text))
            elif item[0] == "done":
                text, calls = held.end()
                if text or calls:
                    yield line(shape.chunk(text, calls))
                yield line(shape.final(item[1], item[2]))
                return
            elif item[0] == "error":
                yield line({"error": item[2]})
                return
    finally:
        req.close()


async def _whole(req, shape: Shape, tools=None):
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
                calls = tools.parse("".join(text)) if tools is not None else None
                return JSONResponse(shape.final(item[1], item[2], "" if calls else "".join(text), calls))
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
            "capabilities": ["completion", "tools"] + (["vision"] if config.vision is not None else [])}


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
    started = timestamp()

    def check_model(body: dict) -> str:
        name = body.get("model") or body.get("name")
        if not name:
            raise refuse("model is required")
        if not isinstance(name, str):
            raise refuse("model: expected a string")
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
        job, streamed, tools = (chat_job if chat else generate_job)(body, req.send, vision)
        if job is None:
            return JSONResponse(shape.loaded(body.get("keep_alive") in (0, "0", "0s", "0m")))
        job.adapter = adapter_of(shape.model)
        try:
            first = await req.admit(job)  # a full queue: a 503
        except ConstraintError as e:
            raise refuse(f"{'tools' if tools is not None else 'format'}: {e}") from None
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            req.close()
            raise ApiError(first[1], first[2])
        shape.accepted()
        if streamed:
            return stream(_lines(req, shape, tools), NDJSON)
        return await _whole(req, shape, tools)

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
