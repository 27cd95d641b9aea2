"""The chat page of `gemma3 serve`: `/` and its static files (cli/web/), and what the page asks first.

The page is plain HTML, CSS and JavaScript shipped in the package: no CDN, no build step, works
offline. It talks to the OpenAI routes of the same server. Every answer here carries a strict
Content-Security-Policy: scripts, styles and connections from this server only, images only from
the page itself (data: and blob: URLs of the user's own pictures), no frames, no forms posting
elsewhere; model output is put on the page as text (app.js), never as HTML.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..prompt import uses_transcript

WEB = Path(__file__).resolve().parent / "web"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "markdown.js": "text/javascript",
         "style.css": "text/css", "icon.svg": "image/svg+xml"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "cache-control": "no-cache"}


def _file(name: str) -> Response:
    return Response((WEB / name).read_bytes(), media_type=FILES[name], headers=HEADERS)


def routes(worker, model_names: tuple[str, ...], api_key: str | None) -> list[Route]:
    """`/` (the page), `/ui/{file}` (its files) and `/ui/info` (the model, for the page: no key needed,
    as /health; it says whether the API wants one)."""
    config = worker.model.config
    info = {"model": model_names[0], "vision": config.vision is not None, "transcript": uses_transcript(config),
            "context": config.text.max_position_embeddings, "api_key": api_key is not None}

    async def page(request: Request):
        return _file("index.html")

    async def static(request: Request):
        name = request.path_params["name"]
        if name not in FILES or name == "index.html":
            return JSONResponse({"error": {"message": f"GET {request.url.path}: no such file", "type":
                                           "not_found_error", "param": None, "code": "not_found"}}, 404,
                                headers=HEADERS)
        return _file(name)

    async def page_info(request: Request):
        return JSONResponse(info, headers=HEADERS)

    return [Route("/", page), Route("/ui/info", page_info), Route("/ui/{name}", static)]
