"""The `gemma3 chat` loop: reading messages (\"\"\" blocks, pastes), the /commands, streaming replies.

The command's options and the loading live in main.py; everything the loop does, ChatSession does.
"""

from __future__ import annotations

import atexit
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer

from ..constrain import MAX_SOURCE_CHARS, Constraint
from ..errors import Gemma3Error
from ..image import load_image
from ..models import cache_dir
from .ui import UI, _warn, error, error_text, note, speculation


CHAT_HELP = '''commands: /image PATH  /system TEXT  /retry  /undo  /reset  /save FILE  /load FILE  /stats  /show
          /set NAME VALUE (temp, top-k, top-p, min-p, repetition-penalty, max-tokens, seed)  /help  /quit
          /set format json | schema FILE | regex PATTERN | grammar FILE | off (replies that programs can parse)
"""  starts a message of several lines; """ again ends it. Ctrl-C stops a reply; Ctrl-D quits.'''

# /set names, as the flags spell them, and the type each takes.
SET_NAMES = {"temp": "temp", "temperature": "temp", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p",
             "repetition-penalty": "repetition_penalty", "max-tokens": "max_tokens", "seed": "seed"}
SET_TYPES = {"temp": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
             "max_tokens": int, "seed": int}


def read_text_arg(value: str) -> str:
    """A file's text when `value` names a file, else `value` itself (inline JSON): bounded either way."""
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        if path.stat().st_size > MAX_SOURCE_CHARS:
            raise ValueError(f"{value}: over {MAX_SOURCE_CHARS:,} bytes; a schema or grammar must be smaller")
        return path.read_text(encoding="utf-8", errors="replace")
    if value.lstrip().startswith(("{", "[")) or "::=" in value or ":" in value:
        return value
    raise ValueError(f"{value}: no such file (give a file, or the schema or grammar itself)")


def constraint_from_options(json_schema: str | None, regex: str | None, grammar: str | None):
    """generate's --json-schema FILE|JSON, --regex PATTERN, --grammar FILE (at most one) -> a Constraint."""
    given = [(k, v) for k, v in (("--json-schema", json_schema), ("--regex", regex), ("--grammar", grammar)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of --json-schema, --regex and --grammar (got {' and '.join(k for k, _ in given)})")
    if json_schema:
        return Constraint.json_schema(read_text_arg(json_schema))
    if regex:
        return Constraint.regex(regex)
    if grammar:
        return Constraint.grammar(read_text_arg(grammar))
    return None


def constraint_from(spec: str):
    """/set format json | schema FILE | regex PATTERN | grammar FILE | off -> a Constraint (None: off)."""
    kind, _, value = spec.partition(" ")
    value = value.strip()
    if kind == "off" and not value:
        return None
    if kind == "json" and not value:
        return Constraint.json_object()
    if kind == "regex" and value:
        return Constraint.regex(value)
    if kind in ("schema", "grammar") and value:
        text = read_text_arg(value)
        return Constraint.json_schema(text) if kind == "schema" else Constraint.grammar(text)
    raise ValueError("usage: /set format json | schema FILE | regex PATTERN | grammar FILE | off")


def _settings_text(session) -> str:
    s = session.settings
    text = ", ".join(f"{flag} {'none' if getattr(s, key) is None else getattr(s, key)}"
                     for flag, key in SET_NAMES.items() if flag != "temperature")
    c = s.constraint
    return text + (f", format {c.describe()}" if c is not None else ", format off")


def run(session, path: Path, pending: list, interactive: bool, read=None) -> None:
    """Read messages until Ctrl-D or /quit; `pending`: images for the first message; `read(prompt, more)`:
    how a message is read (read_message; across ranks, rank 0 reads for all: cli/parallel.py)."""
    read = read or read_message
    model_obj = session.model
    prompt, more = "", ""
    if interactive:
        prompt, more = ">>> ", "... "
        try:
            import readline  # line editing and history for input()

            _keep_history(readline)
            if UI.color is not False and sys.stdout.isatty():  # \001..\002: zero-width for readline
                prompt = "\001\x1b[1;32m\002>>> \001\x1b[0m\002"
        except ImportError:
            pass
        note("gemma3 chat: /help for commands, Ctrl-D to quit", dim=True)
    while True:
        try:
            line = read(prompt, more)
        except EOFError:
            if interactive:
                typer.echo("", err=True)
            raise typer.Exit(0)
        except KeyboardInterrupt:
            typer.echo("", err=True)
            continue
        if not line:
            continue
        replies = None
        with user_errors_kept():
            if line.startswith("/"):
                replies, pending = chat_command(session, path, line, pending)
            else:
                replies = session.send(line, images=pending)
                pending = []
            if replies is not None:
                stream_reply(session, replies)
                r, limit = session.last, model_obj.config.text.max_position_embeddings
                if r is not None and r.prompt_tokens + r.generation_tokens > 0.9 * limit:
                    _warn(f"the conversation uses {r.prompt_tokens + r.generation_tokens} of "
                          f"{limit} context tokens; /reset or /undo to make room")


def read_message(prompt: str, more: str) -> str:
    """One message: a line, or the lines between a line opening with \"\"\" and one ending with it."""
    line = input(prompt).strip()
    if not line.startswith('"""'):
        return line
    text = line[3:]
    if text.endswith('"""'):  # """one line"""
        return text[:-3].strip()
    lines = [text]
    while True:
        line = input(more)
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(line)


def _exchanges(session) -> int:
    return sum(m["role"] == "user" for m in session.messages)


def chat_command(session, path: Path, line: str, pending: list):
    """Run one /command; (replies to stream or None, the images waiting for the next message)."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        raise typer.Exit(0)
    elif cmd == "/help":
        typer.echo(CHAT_HELP)
    elif cmd == "/reset":
        n = _exchanges(session)
        session.reset()
        note(f"cleared the conversation ({n} exchange{'s' * (n != 1)}); the system prompt is kept", dim=True)
    elif cmd == "/undo":
        n = session.undo()
        note("nothing to undo: the conversation is empty" if n is None else f"removed the last exchange ({n} tokens)",
             dim=True)
    elif cmd == "/retry":
        if session.greedy and session.messages:
            note("temperature 0 is greedy decoding: the same reply again (/set temp 0.7 to sample)", dim=True)
        return session.retry(), pending
    elif cmd == "/system":
        session.system = arg or None
        note(f"system prompt set: {arg}" if arg else "system prompt removed", dim=True)
    elif cmd == "/image":
        if session.model.config.vision is None:
            raise ValueError(f"{path.name} is a text-only model: it cannot see images")
        if not arg:
            raise ValueError("/image needs a file: /image PATH")
        load_image(arg)
        note(f"{arg} goes with your next message", dim=True)
        return None, pending + [arg]
    elif cmd == "/save":
        if not arg:
            raise ValueError(f"/save needs a file name, e.g. /save chat-{time.strftime('%Y%m%d-%H%M')}.json")
        session.save(arg)
        n = _exchanges(session)
        note(f"saved {n} exchange{'s' * (n != 1)} to {Path(arg).expanduser().resolve()}", dim=True)
    elif cmd == "/load":
        if not arg:
            raise ValueError("/load needs a file name: /load FILE")
        session.load(arg)
        n = _exchanges(session)
        note(f"loaded {n} exchange{'s' * (n != 1)} from {arg}" + ("; the last one:" if n else ""), dim=True)
        last_user = max((i for i, m in enumerate(session.messages) if m["role"] == "user"), default=None)
        for m in session.messages[last_user:] if last_user is not None else []:
            typer.echo(("you: " if m["role"] == "user" else "model: ") + m["content"])
    elif cmd == "/set" and arg.split(" ", 1)[0].lower() == "format":
        session.set(constraint=constraint_from(arg.partition(" ")[2].strip()))
        note(f"format set to {arg.partition(' ')[2].strip()}", dim=True)
    elif cmd == "/set":
        name, _, value = arg.partition(" ")
        key = SET_NAMES.get(name.lower().replace("_", "-"))
        if key is None or not value.strip():
            raise ValueError(f"usage: /set NAME VALUE, NAME one of {', '.join(SET_NAMES)}")
        value = value.strip()
        try:
            parsed = None if key == "seed" and value.lower() == "none" else SET_TYPES[key](value)
        except ValueError:
            raise ValueError(f"{name} takes {'an integer' if SET_TYPES[key] is int else 'a number'}, "
                             f"not {value!r}") from None
        session.set(**{key: parsed})
        note(f"{name} set to {value}", dim=True)
    elif cmd == "/show":
        typer.echo(f"model     {path}")
        typer.echo(f"system    {session.system or '(none)'}")
        typer.echo(f"settings  {_settings_text(session)}")
    elif cmd == "/stats":
        print_chat_stats(session)
    else:
        error(f"unknown command {cmd} (/help lists them)")
    return None, pending


def print_chat_stats(session) -> None:
    """The last reply's figures (while it is still in the conversation), then the conversation's size."""
    r = session.last
    if r is not None:
        typer.secho(f"prompt {r.prompt_tokens} tokens ({r.prefill_tokens} processed, "
                    f"{r.prompt_tps:.1f} tok/s), reply {r.generation_tokens} tokens "
                    f"({r.generation_tps:.1f} tok/s), KV cache {r.kv_bytes / 1e6:.1f} MB, "
                    f"peak memory {r.peak_memory_gb:.2f} GB{speculation(r.stats)}", dim=True, color=UI.color)
    n = _exchanges(session)
    limit = session.model.config.text.max_position_embeddings
    typer.secho(f"conversation {n} exchange{'s' * (n != 1)}, {session.count_tokens()} of {limit} context tokens",
                dim=True, color=UI.color)


def _keep_history(readline) -> None:
    """Up-arrow history across chats, in the cache directory (best effort: a read-only home is fine)."""
    path = cache_dir() / "chat_history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


@contextmanager
def user_errors_kept():
    """In the chat loop: report a user error in one line and carry on; Ctrl-C during a command
    (/load, /image, /save) cancels that command only (each changes nothing until it has succeeded)."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, OSError, RecursionError, MemoryError, Gemma3Error) as e:
        error(error_text(e))
    except KeyboardInterrupt:
        typer.secho("[cancelled]", err=True, dim=True, color=UI.color)


def stream_reply(session, replies) -> None:
    said = False
    try:
        for r in replies:
            said = True
            sys.stdout.write(r.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        session.cancel()
        replies.close()  # the partial reply stays in the conversation
        typer.secho(" [stopped]" if said else "[stopped before the reply began: the turn was taken back]",
                    err=True, dim=True, color=UI.color)
    sys.stdout.write("\n")
    sys.stdout.flush()
