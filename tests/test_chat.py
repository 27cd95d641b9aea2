"""ChatSession and `gemma3 chat` on the default model: cache reuse per turn, retry, undo, save/load, pipes."""

import os
import subprocess
import sys
import threading

import pytest

import gemma3_mlx
from gemma3_mlx.chat import ChatSession


@pytest.fixture(scope="module")
def session_parts(default_model_dir):
    return gemma3_mlx.load(default_model_dir)


def text(replies):
    return "".join(r.text for r in replies)


def test_turns_process_only_new_tokens_and_retry_runs_nothing(session_parts, tmp_path):
    model, tok = session_parts
    chat = ChatSession(model, tok, system="Answer briefly.", max_tokens=6)
    first = text(chat.send("What is the capital of France?"))
    n1 = chat.last.prompt_tokens
    assert chat.last.prefill_tokens == n1
    second = text(chat.send("And of Italy?"))
    assert chat.last.prompt_tokens > n1 + 6
    assert chat.last.prefill_tokens < chat.last.prompt_tokens - n1 + 8  # only the new turn (and the reply)
    again = text(chat.retry())
    assert again == second and chat.last.prefill_tokens == 0  # greedy: the same reply, from the snapshot
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    chat.undo()
    assert [m["content"] for m in chat.messages] == ["What is the capital of France?", first.strip()]
    chat.save(tmp_path / "c.json")
    other = ChatSession(model, tok, max_tokens=6)
    other.load(tmp_path / "c.json")
    assert other.messages == chat.messages and other.system == "Answer briefly."
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
    assert text(chat.send("Thanks.")) is not None and len(chat.messages) == 4


def test_piped_chat_prints_two_replies(gemma3_home):
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home)}
    r = subprocess.run([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", "-n", "6"], input="Hi\n\nAnd?\n/stats\n",
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout and "Traceback" not in r.stderr
    stats = [line for line in r.stdout.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 1 and "processed" in stats[0]
    processed, total = int(stats[0].split("(")[1].split()[0]), int(stats[0].split()[1])
    assert processed < total  # the second turn reused the first turn's cache


def test_chat_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", "-m", str(tmp_path / "nope")],
                       input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_terminal_chat_session(gemma3_home, tmp_path):
    """Through a pseudo-terminal: two turns, /stats, /retry, /undo, /save, /load, Ctrl-C mid-reply, Ctrl-D."""
    import pty
    import select
    import signal
    import time

    master, slave = pty.openpty()
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_mlx.cli.main", "chat", "-n", "6"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = []

    def expect(marker, timeout=240):
        buf, end = "", time.time() + timeout
        while time.time() < end:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    buf += os.read(master, 4096).decode(errors="replace")
                except OSError:
                    break
                if marker in buf:
                    seen.append(buf)
                    return buf
        raise AssertionError(f"no {marker!r} in {buf!r}")

    def say(line, marker=">>> "):
        os.write(master, (line + "\n").encode())
        return expect(marker)

    try:
        expect(">>> ")
        say("Hi")
        say("And?")
        stats = say("/stats")
        line = next(x for x in stats.splitlines() if x.startswith("prompt "))
        assert int(line.split("(")[1].split()[0]) < int(line.split()[1])  # second turn: only new tokens
        say("/retry")
        assert "(0 processed" in say("/stats")  # the retried reply re-used the whole prompt
        say("/undo")
        say(f"/save {tmp_path / 'c.json'}")
        say(f"/load {tmp_path / 'c.json'}")
        assert (tmp_path / "c.json").exists()
        os.write(master, b"/bogus\n")
        assert "unknown command" in expect(">>> ")
        os.write(master, b"Tell me a very long story about the sea.\n")
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)  # Ctrl-C during the reply: back to the prompt
        expect(">>> ")
        say("Still there?")
        os.write(master, b"\x04")  # Ctrl-D quits
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "Traceback" not in "".join(seen)
