"""ChatSession and `gemma3 chat` on the default model: cache reuse per turn, retry, undo, save/load, pipes."""

import json
import os
import subprocess
import sys
import threading

import pytest

import gemma3_mlx
from conftest import FIXTURES
from gemma3_mlx.chat import ChatSession


@pytest.fixture(scope="module")
def session_parts(default_model):
    return default_model


def text(replies):
    return "".join(r.text for r in replies)


def test_turns_process_only_new_tokens_and_retry_runs_nothing(session_parts, tmp_path):
    model, tok = session_parts
    chat = ChatSession(model, tok, system="Answer briefly.", max_tokens=6)
    first = text(chat.send("What is the capital of France?"))
    n1 = chat.last.prompt_tokens
    assert chat.last.prefill_tokens == n1
    first_reply = chat.messages[-1]
    fed = len(first_reply["ids"])  # every reply token is in the cache, a length-cut reply's last one included
    second = text(chat.send("And of Italy?"))
    assert chat.last.prompt_tokens > n1 + 6
    # Exactly the tokens the cache does not hold: the reply is reused as generated, not re-tokenized.
    assert chat.last.prefill_tokens == chat.last.prompt_tokens - n1 - fed
    again = text(chat.retry())
    assert again == second and chat.last.prefill_tokens == 0  # greedy: the same reply, from the snapshot
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    chat.undo()
    assert [m["content"] for m in chat.messages] == ["What is the capital of France?", first.strip()]
    chat.save(tmp_path / "c.json")
    other = ChatSession(model, tok, max_tokens=6)
    other.load(tmp_path / "c.json")
    assert other.messages == [{k: v for k, v in m.items() if k != "ids"} for m in chat.messages]
    assert other.system == "Answer briefly."
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a saved conversation"):
        other.load(tmp_path / "bad.json")


def test_cancel_from_another_thread_keeps_the_session(session_parts):
    model, tok = session_parts
    chat = ChatSession(model, tok, max_tokens=200)
    replies = chat.send("Tell me a long story.")
    next(replies)
    threading.Thread(target=chat.cancel).start()
    rest = list(replies)
    assert chat.last.generation_tokens < 200 and len(rest) < 199
    assert chat.messages[-1]["role"] == "assistant"
    chat.set(max_tokens=4)
    reply = text(chat.send("Thanks."))
    assert len(chat.messages) == 4
    # The turn after a cancelled reply is what the same conversation gives from scratch (a new session's
    # empty cache; retry() replies to the conversation as it stands).
    fresh = ChatSession(model, tok, max_tokens=4)
    fresh.messages = [dict(m) for m in chat.messages[:3]]
    assert reply == text(fresh.retry()) and fresh.last.prefill_tokens == fresh.last.prompt_tokens


def test_piped_chat_prints_two_replies(gemma3_home, session_parts):
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home)}
    r = subprocess.run([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", "-n", "6"], input="Hi\n\nAnd?\n/stats\n",
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout and "Traceback" not in r.stderr
    # Exactly the two replies the API gives for the same conversation (blank lines skipped), then the statistics.
    chat = ChatSession(*session_parts, max_tokens=6)
    replies = [text(chat.send("Hi")), text(chat.send("And?"))]
    assert r.stdout.startswith(replies[0] + "\n" + replies[1] + "\n")
    stats = r.stdout[len(replies[0] + replies[1]) + 2:].splitlines()
    assert len(stats) == 2 and stats[0].startswith("prompt ") and "processed" in stats[0]
    assert stats[1].startswith("conversation 2 exchanges, ")
    processed, total = int(stats[0].split("(")[1].split()[0]), int(stats[0].split()[1])
    assert processed < total  # the second turn reused the first turn's cache


def test_sampled_retry_draws_anew_and_a_seed_makes_the_session_reproducible(session_parts):
    model, tok = session_parts

    def session(**kw):
        chat = ChatSession(model, tok, max_tokens=8, temp=1.5, seed=7, **kw)
        replies = [text(chat.send("Name an animal.")), text(chat.retry()), text(chat.retry())]
        return chat, replies

    chat, replies = session()
    assert len(set(replies)) > 1  # one random stream for the session: a retry is a new draw
    assert session()[1] == replies  # the same seed, the same session
    assert text(ChatSession(model, tok, max_tokens=8, temp=1.5, seed=8).send("Name an animal.")) != replies[0] or \
        text(ChatSession(model, tok, max_tokens=8, temp=1.5, seed=9).send("Name an animal.")) != replies[0]
    chat.set(temp=0.0)
    assert chat.greedy and text(chat.retry()) == text(chat.retry())  # greedy: the same reply again
    chat.set(top_k=5, min_p=0.1, repetition_penalty=1.2, max_tokens=3)
    assert chat.settings.top_k == 5 and chat.sampler.repetition_penalty == 1.2
    text(chat.retry())
    assert chat.last.generation_tokens <= 3
    with pytest.raises(ValueError, match="top-p"):
        chat.set(top_p=2.0)
    with pytest.raises(ValueError, match="unknown setting"):
        chat.set(tempo=1.0)
    assert chat.settings.top_p == 1.0  # a refused change changes nothing


def test_undo_counts_its_tokens_and_forgets_the_statistics(session_parts):
    model, tok = session_parts
    chat = ChatSession(model, tok, max_tokens=4)
    assert chat.undo() is None and chat.count_tokens() == 0
    text(chat.send("Hi"))
    one = chat.count_tokens()
    text(chat.send("And?"))
    two = chat.count_tokens()
    assert two > one > chat.last.generation_tokens
    assert chat.undo() == two - one and chat.last is None and chat.count_tokens() == one
    assert chat.undo() == one and chat.messages == [] and chat.undo() is None


def test_ctrl_c_inside_a_prefill_chunk_leaves_a_usable_session(session_parts):
    """Ctrl-C while a 512-token chunk runs, after the window rings took it (more than they can take back):
    the turn is taken back, the Ctrl-C (not a cache error) reaches the caller, and the next turn is right."""
    model, tok = session_parts

    class Interrupted:  # the model, interrupted once right after its layers took a chunk
        def __init__(self):
            self.armed = False

        def __getattr__(self, name):
            return getattr(model, name)

        def _after(self, out, length):
            if self.armed and length >= 512:
                self.armed = False
                raise KeyboardInterrupt
            return out

        def __call__(self, ids, *args, **kwargs):
            return self._after(model(ids, *args, **kwargs), ids.shape[1])

        def blocks(self, h, *args, **kwargs):  # what a prefill chunk runs (forward.hidden)
            return self._after(model.blocks(h, *args, **kwargs), h.shape[1])

    chat = ChatSession(model, tok, max_tokens=4)
    text(chat.send("Hi"))
    kept = [dict(m) for m in chat.messages]
    chat.cache.model = interrupted = Interrupted()
    interrupted.armed = True
    with pytest.raises(KeyboardInterrupt):
        text(chat.send("word " * 700))
    assert chat.messages == kept
    again = text(chat.send("And?"))
    fresh = ChatSession(model, tok, max_tokens=4)
    text(fresh.send("Hi"))
    assert again == text(fresh.send("And?"))


def test_chat_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", "-m", str(tmp_path / "nope")],
                       input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


class Terminal:
    """`gemma3 chat` in a pseudo-terminal, read up to a marker (ANSI colours stripped, raw output kept)."""

    def __init__(self, args, home, **env_extra):
        import pty

        master, slave = pty.openpty()
        env = {**os.environ, "GEMMA3_MLX_HOME": str(home), "TERM": "xterm"}
        env.pop("NO_COLOR", None)
        env.update(env_extra)
        self.proc = subprocess.Popen([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", *args],
                                     stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master, self.raw, self.pos = master, "", 0

    def expect(self, marker, timeout=240):
        """The output since the last match, up to and including `marker`."""
        import re
        import select
        import time

        end = time.time() + timeout
        while True:
            clean = re.sub(r"\x1b\[[0-9;]*m|[\x01\x02]", "", self.raw)
            found = clean.find(marker, self.pos)
            if found >= 0:
                out, self.pos = clean[self.pos:found + len(marker)], found + len(marker)
                return out
            if time.time() > end:
                raise AssertionError(f"no {marker!r} in {clean[self.pos:]!r} (exit code {self.proc.poll()}, "
                                     f"output so far ...{self.raw[-600:]!r})")
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.raw += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    raise AssertionError(f"the chat ended: {clean[self.pos:]!r}") from None

    def wait_for_output(self, n, timeout=120):
        """Block until n more characters have arrived (e.g. a reply is streaming)."""
        import time

        end, start = time.time() + timeout, len(self.raw)
        while len(self.raw) - start < n and time.time() < end:
            self.raw += os.read(self.master, 4096).decode(errors="replace")
        assert len(self.raw) - start >= n

    def say(self, line, marker=">>> "):
        os.write(self.master, (line + "\n").encode())
        return self.expect(marker)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


def test_terminal_chat_session(gemma3_home, tmp_path):
    """Through a pseudo-terminal: two turns, /stats, /retry, /undo, /save, /load, an unknown command, Ctrl-D."""
    t = Terminal(["-n", "6"], gemma3_home)
    try:
        t.expect(">>> ")
        t.say("Hi")
        t.say("And?")
        stats = t.say("/stats")
        line = next(x for x in stats.splitlines() if x.startswith("prompt "))
        assert int(line.split("(")[1].split()[0]) < int(line.split()[1])  # second turn: only new tokens
        t.say("/retry")
        assert "(0 processed" in t.say("/stats")  # the retried reply re-used the whole prompt
        t.say("/undo")
        t.say(f"/save {tmp_path / 'c.json'}")
        t.say(f"/load {tmp_path / 'c.json'}")
        assert [m["role"] for m in json.loads((tmp_path / "c.json").read_text())["messages"]] == ["user", "assistant"]
        assert "unknown command" in t.say("/bogus")
        os.write(t.master, b"\x04")  # Ctrl-D quits
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert "Traceback" not in t.raw
    assert "/bogus" in (gemma3_home / "chat_history").read_text()  # up-arrow history survives the session
    # A terminal gets colours: the prompt, statistics, errors.
    assert "\x1b[1;32m>>> " in t.raw and "\x1b[2mprompt " in t.raw and "\x1b[31m\x1b[1merror: " in t.raw


def test_terminal_chat_commands_say_what_they_did(gemma3_home, tmp_path):
    """Every command answers: /set, /show, /retry (greedy and sampled), /undo, /save, /load, /reset, /system,
    /image on a text-only model, and a message of several lines between triple quotes."""
    t = Terminal(["-n", "4", "--system", "Be brief.", "--min-p", "0.05", "--repetition-penalty", "1.1"], gemma3_home,
                 NO_COLOR="1")
    try:
        start = t.expect(">>> ")
        assert start.index("loading gemma-3-270m ...") < start.index("warning: gemma-3-270m is a base model: ") \
            < start.index("gemma3 chat: /help for commands")  # the default model is a base model: said once
        assert start.count("warning: ") == 1 and "-m google/gemma-3-270m-it" in start
        assert "nothing to undo: the conversation is empty" in t.say("/undo")
        show = t.say("/show")
        assert "model     " + str(gemma3_home / "models" / "gemma-3-270m") in show and "system    Be brief." in show
        assert "min-p 0.05, repetition-penalty 1.1, max-tokens 4, seed none" in show
        os.write(t.master, b'"""First line\n')
        t.expect("... ")
        t.say('second line"""')
        assert "temperature 0 is greedy decoding: the same reply again" in t.say("/retry")
        assert "temp set to 0.8" in t.say("/set temp 0.8")
        assert "top-k set to 40" in t.say("/set top-k 40")
        assert "temp 0.8, top-k 40, " in t.say("/show")
        assert "greedy" not in t.say("/retry")
        assert "conversation 1 exchange, " in t.say("/stats")
        assert "error: /save needs a file name, e.g. /save chat-" in t.say("/save")
        assert f"saved 1 exchange to {tmp_path / 'c.json'}" in t.say(f"/save {tmp_path / 'c.json'}")
        undo = t.say("/undo")
        assert "removed the last exchange (" in undo and " tokens)" in undo
        stats = t.say("/stats")
        assert "prompt " not in stats and "conversation 0 exchanges, 0 of " in stats  # as it is after /undo
        loaded = t.say(f"/load {tmp_path / 'c.json'}")
        assert f"loaded 1 exchange from {tmp_path / 'c.json'}; the last one:" in loaded
        assert "you: First line\r\nsecond line\r\nmodel: " in loaded  # the two lines arrived as one message
        assert "error: gemma-3-270m is a text-only model: it cannot see images" in t.say("/image photo.jpg")
        assert "system prompt set: Answer in French." in t.say("/system Answer in French.")
        assert "cleared the conversation (1 exchange); the system prompt is kept" in t.say("/reset")
        os.write(t.master, b"\x1b[200~Pasted one\nPasted two\x1b[201~\n")  # a bracketed paste of two lines
        t.expect(">>> ")
        t.say(f"/save {tmp_path / 'pasted.json'}")
        pasted = json.loads((tmp_path / "pasted.json").read_text())["messages"]
        assert [m["content"] for m in pasted if m["role"] == "user"] == ["Pasted one\nPasted two"]  # one message
        assert "error: usage: /set NAME VALUE" in t.say("/set bogus 1")
        assert "error: top-p must be in (0, 1]" in t.say("/set top-p 3")
        os.write(t.master, b"\x04")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert "Traceback" not in t.raw
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"][0]["content"] == "First line\nsecond line" and saved["system"] == "Be brief."


def test_terminal_ctrl_c_stops_the_reply_and_keeps_the_session(gemma3_home):
    import signal
    import time

    t = Terminal(["-n", "300"], gemma3_home, NO_COLOR="1")
    try:
        t.expect(">>> ")
        os.write(t.master, b"Count from 1 to 100, one number per line.\n")
        t.expect("one number per line.", timeout=60)  # the echo of the line
        t.wait_for_output(12)  # the reply is streaming
        t.proc.send_signal(signal.SIGINT)  # Ctrl-C during the reply
        assert "[stopped]" in t.expect(">>> ")
        stats = t.say("/stats")
        line = next(x for x in stats.splitlines() if x.startswith("prompt "))
        assert 0 < int(line.split("reply ")[1].split()[0]) < 300  # the reply was cut short
        os.write(t.master, b"/undo\n")
        t.expect(">>> ")
        # Ctrl-C at the prompt: a fresh prompt. Wait until the prompt is really waiting for a key: CPython's
        # readline only looks at signals once it blocks, so a Ctrl-C within microseconds of the prompt being
        # drawn (no human is that fast) waits for the next key press.
        time.sleep(0.5)
        t.proc.send_signal(signal.SIGINT)
        t.expect(">>> ")
        t.say("/set max-tokens 6")  # the base model does not stop by itself: keep the next reply short
        t.say("Say OK.")
        after = next(x for x in t.say("/stats").splitlines() if x.startswith("prompt "))
        assert after != line  # a new reply: the session is still chatting
        os.write(t.master, b"\x04")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert "Traceback" not in t.raw
    assert "\x1b[1;32m" not in t.raw and "\x1b[2m" not in t.raw  # NO_COLOR is respected


def test_terminal_ctrl_c_while_the_prompt_is_processed_takes_the_turn_back(gemma3_home):
    import signal
    import time

    t = Terminal(["-n", "4"], gemma3_home, NO_COLOR="1")
    try:
        t.expect(">>> ")
        t.say("Hi")
        long = " ".join(f"w{i}" for i in range(3000))  # seconds of prompt processing
        os.write(t.master, b"\x1b[200~" + long.encode() + b" END\x1b[201~\n")
        t.expect("END\r\n", timeout=60)  # the echo of the message, and of Enter: the line was read
        time.sleep(0.5)  # past input(): its return and the rendering of the prompt take a moment
        t.proc.send_signal(signal.SIGINT)
        assert "[stopped before the reply began: the turn was taken back]" in t.expect(">>> ")
        assert "conversation 1 exchange, " in t.say("/stats")  # only "Hi" and its reply
        os.write(t.master, b"\x04")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert "Traceback" not in t.raw


def test_images_stay_in_their_turn_and_are_reused(seeing_270m):
    """An image sent with turn 1 stays in turn 1 when turn 2 is rendered, so turn 2 runs only its own tokens."""
    from gemma3_mlx.model import image_spans_of as _image_spans

    model, tok = seeing_270m
    chat = ChatSession(model, tok, max_tokens=4)
    text(chat.send("What is this?", images=[FIXTURES / "images" / "rgb.png"]))
    n1, fed = chat.last.prompt_tokens, len(chat.messages[-1]["ids"])
    ids_after_turn_1 = list(chat.cache.tokens)
    text(chat.send("And the colours?"))
    assert chat.last.prefill_tokens == chat.last.prompt_tokens - n1 - fed
    ids = list(chat.cache.tokens)
    assert ids[:len(ids_after_turn_1)] == ids_after_turn_1
    spans = _image_spans(ids, model.config.image_token_index)
    assert len(spans) == 1 and spans[0][1] < n1  # one image, inside the first turn
    replaced = text(chat.send("Compare them.", images=[FIXTURES / "images" / "wide.png"]))
    assert len(_image_spans(list(chat.cache.tokens), model.config.image_token_index)) == 2
    again = text(chat.retry())
    assert chat.last.prefill_tokens == 0 and again == replaced  # greedy: the reply it replaces, from the snapshot


def test_piped_chat_image_command(seeing_270m_dir, tmp_path):
    from conftest import gemma3

    r = gemma3(["chat", "-m", seeing_270m_dir, "-n", "4"],
               input=f"/image {tmp_path / 'missing.png'}\n/image {FIXTURES / 'images' / 'rgb.png'}\n"
                     "What is this?\nThanks.\n/stats\n")
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing.png" in errors[0] and "Traceback" not in r.stderr  # the chat went on
    stats = [line for line in r.stdout.splitlines() if line.startswith("prompt ")]
    total = int(stats[0].split()[1])
    assert total > 16 + 10  # the image block is in the conversation
    assert "\x1b[" not in r.stdout + r.stderr  # no colours into a pipe


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread signal masks from Linux /proc")
def test_worker_threads_leave_ctrl_c_to_the_main_thread(default_model_dir):
    """OpenBLAS/MLX/numpy worker threads block SIGINT, so Ctrl-C at a blocking prompt always wakes the main thread."""
    code = """
import glob, os, sys
import gemma3_mlx
model, tok = gemma3_mlx.load(sys.argv[1])
gemma3_mlx.generate(model, tok, "Hi", max_tokens=2)
for f in glob.glob("/proc/self/task/*/status"):
    d = dict(line.split(":", 1) for line in open(f).read().splitlines() if ":" in line)
    print(int(d["Pid"]) == os.getpid(), int(d["SigBlk"], 16) & 2)  # SIGINT is signal 2: bit 1
"""
    r = subprocess.run([sys.executable, "-c", code, str(default_model_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert len(rows) >= 2 and ["True", "0"] in rows  # the main thread takes SIGINT
    assert all(blocked == "2" for main, blocked in rows if main == "False")  # no worker thread does


def test_a_failed_turn_is_taken_back(session_parts, tmp_path):
    """A turn that fails before its first token (prompt past the context, unreadable image) leaves the
    conversation as it was, so the next turn works without /undo."""
    model, tok = session_parts
    chat = ChatSession(model, tok, max_tokens=3)
    text(chat.send("Hi"))
    kept = [dict(m) for m in chat.messages]
    with pytest.raises(ValueError, match="context"):
        text(chat.send("word " * (model.config.text.max_position_embeddings + 10)))
    assert chat.messages == kept
    with pytest.raises(ValueError, match="cannot see images"):
        text(chat.send("What is this?", images=[FIXTURES / "images" / "rgb.png"]))  # a text-only model
    assert chat.messages == kept
    text(chat.send("And?"))
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hi", "And?"]
    assert chat.last.prefill_tokens < chat.last.prompt_tokens  # the cache still holds the first turn
