"""The chat page of `gemma3 serve`, in a real browser: Debian's /usr/bin/chromium driven by Playwright.

Two servers run in this process, on 127.0.0.1:
- `real`: the default 270M (a base model: it chats through a transcript) with the tiny SigLIP eyes
  (conftest.give_eyes), no key. Its replies are checked against the library's own for the same turns.
- `scripted`: a stand-in: the server's own app over a Worker whose requests are answered with a
  scripted text (no model runs), with an API key. It makes the hostile reply (`<img onerror>`,
  `<script>`), a slow reply to stop, and a code block to copy deterministic, and records what the
  page sent.
Without chromium or playwright these tests skip with the reason, unless GEMMA3_REQUIRE_BROWSER is
set (.ci/run sets it once it has installed chromium): then they fail.
"""

import base64
import http.client
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import uvicorn

import gemma3_mlx
from conftest import FIXTURES
from gemma3_mlx.prompt import MARKER
from test_server import free_port, make_tiny, wait_healthy

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The README's screenshots are rewritten only when asked (GEMMA3_SCREENSHOTS=1): a test run leaves the tree clean.
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "images" if os.environ.get("GEMMA3_SCREENSHOTS") else None
KEY = "page-key"
HOSTILE = ('Here: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
           '[x](javascript:window.__pwned=3) **bold** `<b>code</b>`\n\n```html\n<img src=y onerror="window.__pwned=4">\n```')
CODE = "Run this:\n\n```python\nprint('hi')\n```\n\nThat is all."
PNG = FIXTURES / "images" / "rgb.png"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None


def _need_browser():
    why = ("playwright is not installed" if sync_playwright is None else
           f"no {CHROMIUM} (apt-get install chromium)" if not os.path.exists(CHROMIUM) else None)
    if why and os.environ.get("GEMMA3_REQUIRE_BROWSER"):
        pytest.fail(f"the page tests must run here: {why}")
    if why:
        pytest.skip(why)


class Served:
    """A Worker's app served by uvicorn in a thread of this process."""

    def __init__(self, worker, name: str, api_key=None):
        from gemma3_mlx.cli.serve import make_app

        self.worker, self.name = worker, name
        worker.start()
        self.port = free_port()
        app = make_app(worker, (name,), api_key=api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.port)
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()


def scripted_worker(model, tokenizer):
    from gemma3_mlx.cli.serve_worker import Worker

    class Scripted(Worker):
        """Answers each request with the next scripted (text, seconds per piece); records the jobs."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.script, self.seen = [], []

        def submit(self, job) -> bool:
            self.seen.append(job)
            threading.Thread(target=self._answer, args=(job,), daemon=True).start()
            return True

        def cancel(self, job) -> None:
            job.cancelled = True

        def _answer(self, job):
            text, delay = self.script.pop(0) if self.script else ("Nothing scripted.", 0)
            job.send(("accepted", 30))
            pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
            for piece in pieces:
                time.sleep(delay)
                if getattr(job, "cancelled", False):
                    return
                job.send(("delta", piece, None))
            job.send(("done", "stop", {"prompt_tokens": 30, "completion_tokens": len(pieces), "cached_tokens": 20}))

    return Scripted(model, tokenizer, max_batch=2, cache_bytes=1 << 20, max_queue=4)


@pytest.fixture(scope="module")
def real(seeing_270m_dir, tmp_path_factory):
    from gemma3_mlx.cli.serve_worker import Worker

    # The seeing 270M keeps its base model's kind at the top of its config (give_eyes nests it).
    path = tmp_path_factory.mktemp("page") / "gemma-3-270m-eyes"
    path.mkdir()
    for f in seeing_270m_dir.iterdir():
        if f.name != "config.json":
            (path / f.name).symlink_to(f.resolve())
    config = json.loads((seeing_270m_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "instruction_tuned": False}))
    model, tok = gemma3_mlx.load(path)
    assert model.config.vision is not None and model.config.instruction_tuned is False
    served = Served(Worker(model, tok, max_batch=2, cache_bytes=64 << 20), path.name)
    served.model, served.tokenizer = model, tok
    yield served
    served.close()


@pytest.fixture(scope="module")
def scripted(tokenizer_270m, tmp_path_factory):
    model, tok = gemma3_mlx.load(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("page") / "tiny-text"))
    served = Served(scripted_worker(model, tok), "tiny-text", api_key=KEY)
    yield served
    served.close()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Page:
    """A page in a fresh browser context, recording every request and every console error."""

    def __init__(self, browser, served, **context):
        self.served = served
        self.context = browser.new_context(viewport={"width": 1100, "height": 720}, **context)
        self.page = self.context.new_page()
        self.requests, self.errors, self.bodies = [], [], []
        self.page.on("request", self._request)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _request(self, r):
        self.requests.append(r.url)
        if r.url.endswith("/v1/chat/completions"):
            self.bodies.append(json.loads(r.post_data))

    def open(self):
        self.page.goto(self.served.url)
        self.page.wait_for_selector("body[data-ready='1']")

    def send(self, text):
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_done(self, n_replies, timeout=120_000):
        """Until the page shows n finished replies (each has its statistics, or was stopped)."""
        self.page.wait_for_function(
            f"() => document.querySelectorAll('.msg.assistant .foot .regenerate').length == 1 && "
            f"document.querySelectorAll('.msg.assistant').length == {n_replies} && "
            f"document.getElementById('stop').hidden", timeout=timeout)

    def replies(self):
        return [t.strip() for t in self.page.locator(".msg.assistant .body").all_inner_texts()]

    def stats(self):
        return self.page.locator(".msg.assistant .stats").all_inner_texts()

    def check_clean(self):
        """Nothing left 127.0.0.1 (not even a request for a hostile reply's image) and no console error."""
        outside = [u for u in self.requests if not u.startswith((self.served.url, "data:"))]
        assert outside == [] and self.errors == []
        assert not [u for u in self.requests if u.rstrip("/").endswith(("/x", "/y"))]

    def close(self):
        self.context.close()


def library_replies(served, turns, images=(), max_tokens=512):
    """What ChatSession gives for the same turns (greedy): the page must show exactly this."""
    chat = gemma3_mlx.ChatSession(served.model, served.tokenizer, max_tokens=max_tokens)
    out = []
    for i, t in enumerate(turns):
        out.append(("".join(r.text for r in chat.send(t, images=images if i == 0 else ())), chat.last.prompt_tokens))
    return out


def test_the_page_and_its_files_carry_a_strict_csp(scripted):
    c = http.client.HTTPConnection("127.0.0.1", scripted.port, timeout=10)
    for path, kind in [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/markdown.js", "text/javascript"),
                       ("/ui/style.css", "text/css")]:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        assert r.status == 200 and r.getheader("content-type").startswith(kind) and body
        csp = r.getheader("content-security-policy")
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self';" in csp
        assert "unsafe" not in csp and "http" not in csp and r.getheader("x-content-type-options") == "nosniff"
    for path in ["/ui/serve.py", "/ui/..%2Fserve.py", "/ui/index.html"]:
        c.request("GET", path)
        r = c.getresponse()
        assert r.status == 404 and b"no such" in r.read()
    c.request("GET", "/ui/info")
    info = json.loads(c.getresponse().read())
    assert info == {"model": "tiny-text", "vision": False, "transcript": False, "context": 2048, "api_key": True}
    c.request("GET", "/")
    page = c.getresponse().read().decode()
    assert "<script>" not in page and " on" not in page.lower().replace(" one", "")  # no inline script or handler


def test_send_with_enter_streams_the_transcript_reply_then_reload_finds_it(browser, real):
    want = library_replies(real, ["What is the capital of France?", "And of Italy?"])
    assert "Paris" in want[0][0] and "Rome" in want[1][0]
    p = Page(browser, real)
    try:
        p.open()
        assert p.page.inner_text("#model-name") == real.name and "base model" in p.page.inner_text("#model-kind")
        p.send("What is the capital of France?")
        seen = set()  # the reply as it grows: streamed, not arriving whole
        end = time.time() + 120
        while time.time() < end and p.page.locator("#stop").is_visible():
            text = p.page.locator(".msg.assistant .body").inner_text()
            if text:
                seen.add(text)
            time.sleep(0.02)
        p.wait_done(1)
        assert len(seen) >= 2, seen
        p.send("And of Italy?")
        p.wait_done(2)
        assert p.replies() == [w[0] for w in want]
        stats = p.stats()
        # The usage the page shows is the server's: prompt tokens as the library counts them, and the
        # second turn's prompt mostly from the cache (the first turn and its reply, as generated).
        assert f"prompt {want[0][1]} tokens, 0 from cache" in stats[0]
        cached = int(stats[1].split("tokens, ")[1].split()[0])
        assert f"prompt {want[1][1]} tokens" in stats[1] and want[0][1] <= cached < want[1][1]
        assert "tok/s" in stats[1]
        body = p.bodies[-1]
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert [m["content"] for m in body["messages"]] == ["What is the capital of France?", want[0][0], "And of Italy?"]
        # Screenshots for the README, light and dark (the system's setting), of this conversation.
        shots = SHOTS or Path(tempfile.mkdtemp())
        shots.mkdir(parents=True, exist_ok=True)
        p.page.screenshot(path=str(shots / "page-light.png"))
        dark = Page(browser, real, color_scheme="dark")
        dark.page.goto(real.url)  # a new context: its own storage; the same conversation, loaded from it
        dark.page.evaluate("([k, v]) => localStorage.setItem(k, v)",
                           ["gemma3.conversations", p.page.evaluate("localStorage.getItem('gemma3.conversations')")])
        dark.open()
        assert dark.replies() == [w[0] for w in want]
        background = dark.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 24, 28)"  # the dark theme, by prefers-color-scheme
        dark.page.screenshot(path=str(shots / "page-dark.png"))
        dark.check_clean()
        dark.close()
        assert p.page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
        # Reload: the conversation is still there, from localStorage.
        p.page.reload()
        p.page.wait_for_selector("body[data-ready='1']")
        assert p.replies() == [w[0] for w in want]
        assert p.page.locator("#conversations li").count() == 1
        assert "capital of France" in p.page.inner_text("#conversations li")
        p.check_clean()
    finally:
        p.close()


def test_images_by_picker_drop_and_paste_reach_the_vision_model(browser, real):
    data = PNG.read_bytes()
    # The API puts each image where its part stands: after the text here.
    want = library_replies(real, ["What is in these pictures?" + MARKER * 3], images=[PNG, PNG, PNG], max_tokens=16)
    p = Page(browser, real)
    try:
        p.open()
        p.page.click("#settings-toggle")
        p.page.fill("#max_tokens", "16")
        p.page.set_input_files("#file", str(PNG))
        b64 = base64.b64encode(data).decode()
        p.page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const file = () => new File([bytes], "rgb.png", {type: "image/png"});
            const drop = new DataTransfer(); drop.items.add(file());
            document.getElementById("messages").dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true}));
            const paste = new DataTransfer(); paste.items.add(file());
            document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", {clipboardData: paste, bubbles: true}));
        }""", b64)
        p.page.wait_for_function("() => document.querySelectorAll('#attachments img').length == 3")
        p.send("What is in these pictures?")
        p.wait_done(1)
        sent = p.bodies[-1]["messages"][-1]["content"]
        urls = [part["image_url"]["url"] for part in sent if part["type"] == "image_url"]
        assert urls == ["data:image/png;base64," + b64] * 3
        assert p.page.locator(".msg.user .images img").count() == 3
        # The server saw three images: its prompt is the library's with three image blocks.
        assert p.replies() == [want[0][0]] and f"prompt {want[0][1]} tokens" in p.stats()[0]
        p.check_clean()
    finally:
        p.close()


def test_json_schema_mode_gives_a_reply_that_follows_the_schema(browser, real):
    import jsonschema

    p = Page(browser, real)
    try:
        p.open()
        p.page.click("#settings-toggle")
        p.page.fill("#max_tokens", "64")
        p.page.check("#json-mode")
        schema = json.loads(p.page.input_value("#schema"))
        p.send("What is the capital of France?")
        p.wait_done(1)
        assert p.bodies[-1]["response_format"]["json_schema"]["schema"] == schema
        reply = json.loads(p.replies()[0])  # the model's reply, constrained by the server
        jsonschema.validate(reply, schema)
        p.check_clean()
    finally:
        p.close()


def test_hostile_reply_is_shown_as_text_and_nothing_runs(browser, scripted):
    scripted.worker.script = [(HOSTILE, 0)]
    p = Page(browser, scripted)
    try:
        p.page.goto(scripted.url)
        p.page.wait_for_selector("#key-dialog[open]")  # asked once for the key
        p.page.fill("#key", KEY)
        p.page.press("#key", "Enter")
        p.page.wait_for_selector("body[data-ready='1']")
        p.send("Say something.")
        p.wait_done(1)
        body = p.page.locator(".msg.assistant .body")
        text = body.inner_text()
        assert '<img src=x onerror="window.__pwned=1">' in text and "<script>window.__pwned=2</script>" in text
        assert '<img src=y onerror="window.__pwned=4">' in body.locator(".code pre").inner_text()
        assert body.locator("img, script, iframe").count() == 0
        assert body.locator("strong").inner_text() == "bold" and body.locator("p code").inner_text() == "<b>code</b>"
        assert body.locator("a").count() == 0  # javascript: is no link
        time.sleep(0.5)
        assert p.page.evaluate("window.__pwned") is None
        assert "prompt 30 tokens, 20 from cache (67%)" in p.stats()[0]
        # Reloaded, the key is not asked again.
        p.page.reload()
        p.page.wait_for_selector("body[data-ready='1']")
        assert not p.page.locator("#key-dialog[open]").count()
        assert p.page.evaluate("window.__pwned") is None
        p.check_clean()
    finally:
        p.close()


def test_stop_regenerate_edit_settings_copy_and_conversations(browser, scripted):
    worker = scripted.worker
    p = Page(browser, scripted)
    p.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=scripted.url.rstrip("/"))
    try:
        p.page.goto(scripted.url)
        p.page.evaluate("(k) => localStorage.setItem('gemma3.apiKey', k)", KEY)
        p.open()
        assert not p.page.locator("#key-dialog[open]").count()
        # A text-only model refuses images, saying why.
        p.page.set_input_files("#file", str(PNG))
        assert "tiny-text is a text-only model: it cannot see images" in p.page.inner_text("#notice")
        assert p.page.locator("#attachments img").count() == 0
        # Shift+Enter adds a line; Enter sends. Stop mid-reply keeps what came.
        worker.script = [("word " * 400, 0.05), (CODE, 0)]
        p.page.fill("#input", "Line one")
        p.page.press("#input", "Shift+Enter")
        p.page.type("#input", "line two")
        assert p.page.input_value("#input") == "Line one\nline two"
        p.page.press("#input", "Enter")
        p.page.wait_for_function("() => (document.querySelector('.msg.assistant .body') || {}).innerText?.length > 20")
        p.page.click("#stop")
        p.wait_done(1)
        assert worker.seen[-1].messages[-1]["content"] == "Line one\nline two"
        end = time.time() + 5
        while not getattr(worker.seen[-1], "cancelled", False) and time.time() < end:
            time.sleep(0.05)
        assert getattr(worker.seen[-1], "cancelled", False)  # the server heard the stop
        stopped = p.replies()[0]
        assert 20 < len(stopped) < len("word " * 400) - 100 and p.page.locator(".msg .stopped").count() == 1
        # Regenerate: the reply is replaced, a code block with a copy button.
        p.page.click(".regenerate")
        p.wait_done(1)
        assert p.page.locator(".msg.assistant").count() == 1 and p.page.locator(".msg .stopped").count() == 0
        p.page.click(".code .copy")
        assert p.page.evaluate("navigator.clipboard.readText()") == "print('hi')"
        # Settings: system prompt, sampling, JSON-schema mode go into the request.
        worker.script = [('{"answer": "4"}', 0)]
        p.page.click("#settings-toggle")
        p.page.fill("#system", "Answer in JSON.")
        p.page.fill("#temperature", "0.7")
        p.page.fill("#max_tokens", "64")
        p.page.fill("#seed", "5")
        p.page.check("#json-mode")
        p.send("2 + 2?")
        p.wait_done(2)
        body = p.bodies[-1]
        assert body["messages"][0] == {"role": "system", "content": "Answer in JSON."}
        assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.7, 64, 5)
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["answer"]
        assert worker.seen[-1].messages[0] == {"role": "system", "content": "Answer in JSON."}
        # Edit and resend the first message: the conversation is cut there and goes on from the edit.
        worker.script = [("Edited reply.", 0)]
        p.page.locator(".msg.user .edit").first.click()
        p.page.fill(".edit-area", "A new first message")
        p.page.click(".resend")
        p.wait_done(1)
        assert p.page.locator(".msg").count() == 2 and p.replies() == ["Edited reply."]
        assert [m["content"] for m in worker.seen[-1].messages] == ["Answer in JSON.", "A new first message"]
        # Conversations: new, rename, delete; kept across a reload.
        p.page.click("#new-chat")
        worker.script = [("Second chat.", 0)]
        p.send("Hello again")
        p.wait_done(1)
        items = p.page.locator("#conversations li")
        assert items.count() == 2 and "Hello again" in items.nth(0).inner_text()
        items.nth(0).hover()
        items.nth(0).locator(".rename").click()
        p.page.fill(".rename-input", "Greetings")
        p.page.press(".rename-input", "Enter")
        p.page.reload()
        p.page.wait_for_selector("body[data-ready='1']")
        assert [t.strip() for t in p.page.locator("#conversations .title").all_inner_texts()] == [
            "Greetings", "Line one line two"]
        p.page.locator("#conversations li").nth(1).hover()  # its buttons show on hover
        p.page.locator("#conversations li").nth(1).locator(".delete").click()
        assert p.page.locator("#conversations li").count() == 1
        p.page.locator("#conversations .title").first.click()
        assert p.replies() == ["Second chat."]
        p.check_clean()
    finally:
        p.close()


def test_serve_open_opens_the_page_in_the_browser(gemma3_home, tmp_path):
    # webbrowser takes $BROWSER first: here a command that writes down the address it was given.
    import subprocess
    import sys
    import urllib.request

    opened = tmp_path / "opened"
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home), "BROWSER": f"sh -c 'echo %s > {opened}'",
           "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_mlx.cli.main", "serve", "--open", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.time() + 240
        while not (opened.exists() and opened.read_text().strip()) and time.time() < end and proc.poll() is None:
            time.sleep(0.2)
        url = opened.read_text().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/") and not url.endswith(":0/")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b'<script src="/ui/app.js"' in r.read()
            assert "default-src 'none'" in r.headers["content-security-policy"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"chat page: {url}" in err
