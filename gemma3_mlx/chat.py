"""A chat with a model: `ChatSession` keeps the conversation and its prompt cache.

Each turn is rendered with Gemma's chat format and handed to `stream_generate` with the
session's `PromptCache`, so only the new tokens run; `retry` regenerates the last reply from a
cache snapshot (nothing re-processed), `undo` drops the last exchange, `cancel` (from any thread)
stops the reply being streamed. One sampler serves the whole session: a seed seeds it once, so a
retried reply is a new draw and a seeded session is reproducible as a whole. Conversations save
to JSON (images by path), atomically. No terminal I/O here.

Threads: a session may be used from any thread, and from several: replies take turns. A `send()`
or `retry()` from a second thread waits until the reply being streamed has been read to the end
(or closed, or cancelled); the same thread asking for a new reply while its own is still open gets
a RuntimeError instead of waiting forever. `cancel()` never waits. Text typed in messages stays
text: "<end_of_turn>" in a message cannot forge a turn unless the session is made with
`control_tokens=True`.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ._atomic import replace_file
from .generate import GenerationResponse, settings_from, stream_generate
from .prompt import MARKER, TRANSCRIPT_STOP, prompt_ids, uses_transcript
from .prompt_cache import PromptCache
from .speculate import DraftModel, PromptLookup
from .settings import Sampling
from .tools import ToolUse, chat_messages

MAX_SAVED_BYTES = 32 << 20  # a saved conversation: a 128K-token context is about 0.5 MB of text


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, pan_and_scan: bool = False, *,
                 draft_model=None, prompt_lookup: bool = False, control_tokens: bool = False,
                 transcript: bool | None = None, settings: Sampling | None = None, tools=None,
                 tool_choice="auto", parallel_tool_calls: bool = True, **sampling):
        self.model, self.tokenizer = model, tokenizer
        # A base model chats through a transcript ("User: ... Assistant: ..."; see prompt.py); None: by the model.
        self.transcript = uses_transcript(model.config) if transcript is None else transcript
        self.control_tokens = control_tokens  # read "<start_of_turn>" etc. typed in messages as tokens
        # Speculative decoding: a draft model keeps its own prompt cache through the conversation.
        self.draft = DraftModel(draft_model) if draft_model is not None else PromptLookup() if prompt_lookup else None
        self.system = system
        self.pan_and_scan = pan_and_scan
        self.settings: Sampling = settings_from(settings, sampling)  # how replies are drawn (settings.py)
        # Tool calls (tools.py): the tools join the system prompt; each reply is held to tool_choice.
        self.tools = ToolUse.from_request(tools, tool_choice, parallel_tool_calls) if tools else None
        if self.tools is not None and self.settings.constraint is not None:
            raise ValueError("a constraint and tools cannot be combined (a call is already held to its schema)")
        self.messages: list[dict] = []  # {"role": "user"|"assistant", "content": str, "images": [paths]}
        self.cache = PromptCache(model)
        self.last: GenerationResponse | None = None  # statistics of the last reply still in the conversation
        self._cancel = threading.Event()
        self._sampler, self._sampler_made_from = None, None
        self._turn = threading.Lock()  # held while a reply is being streamed
        self._streaming_in: int | None = None  # the thread that streams it

    @contextmanager
    def _exclusive(self):
        """Hold the session: wait for another thread's reply to finish; refuse this thread's own."""
        if self._streaming_in == threading.get_ident():
            raise RuntimeError("this ChatSession is still streaming a reply in this thread: read it to the end "
                               "or close() it before asking for another, or changing the conversation")
        with self._turn:
            self._streaming_in = threading.get_ident()
            try:
                yield
            finally:
                self._streaming_in = None

    def set(self, **changes) -> None:
        """Change settings (any of settings.Sampling's: temp, top_k, top_p, min_p, repetition_penalty,
        max_tokens, seed, stop, constraint) from the next reply on; a bad value changes nothing. A new
        seed restarts the random stream; other changes keep it going."""
        self.settings = self.settings.replace(**changes)

    @property
    def sampler(self):
        """The session's sampler, remade when a setting changed (keeping its random key unless the seed did)."""
        s = self.settings
        made_from = s.draw() + (s.seed,)
        if made_from != self._sampler_made_from:
            old, old_seed = self._sampler, self._sampler_made_from and self._sampler_made_from[-1]
            self._sampler = s.sampler()
            if old is not None and s.seed == old_seed:
                self._sampler.key = old.key  # the same random stream goes on
            self._sampler_made_from = made_from
        return self._sampler

    @property
    def greedy(self) -> bool:
        """Temperature 0: a retried reply is the same reply."""
        return self.settings.temp == 0

    @property
    def calls(self) -> list[dict] | None:
        """The last reply's tool calls ([{"id", "name", "arguments"}], arguments as JSON text), or None
        when it is text (or no tools were given). Answer them with `send_tool_results`."""
        last = self.messages[-1] if self.messages else None
        return last.get("tool_calls") if last and last["role"] == "assistant" else None

    def send_tool_results(self, results: dict) -> Iterator[GenerationResponse]:
        """Answer the last reply's calls ({call id: result text}) and stream the next reply."""
        calls = {c["id"] for c in self.calls or ()}
        unknown = [k for k in results if k not in calls]
        if unknown or not results:
            raise ValueError(f"no call of the last reply has the id {unknown[0]!r}" if unknown else "no results")
        adds = [{"role": "tool", "tool_call_id": k, "content": str(v), "images": []} for k, v in results.items()]

        def add():
            self.messages.extend(adds)

        return self._reply(add)

    def count_tokens(self) -> int:
        """Tokens the conversation takes as it stands (0 when empty; the system prompt joins the first turn)."""
        if not self.messages:
            return 0
        msgs, images = self._render()
        return len(prompt_ids(self.tokenizer, self.model.config, msgs, images or None, self.pan_and_scan,
                              self.control_tokens, self.transcript)[0])

    def send(self, text: str, images=()) -> Iterator[GenerationResponse]:
        """Add a user message (and images) and stream the reply; the message joins the conversation
        when the reply starts (the first `next()`), after any reply another thread is streaming.
        If the reply fails before its first token (an unreadable image, a prompt longer than the
        context, Ctrl-C while the prompt is processed), the message is taken back, so the
        conversation stays usable."""
        message = {"role": "user", "content": str(text), "images": [str(i) for i in images]}

        def add():
            self.messages.append(message)

        return self._reply(add)

    def retry(self) -> Iterator[GenerationResponse]:
        """Regenerate the last reply."""
        if not self.messages:
            raise ValueError("nothing to retry: the conversation is empty")

        def drop_reply():
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if not self.messages:
                raise ValueError("nothing to retry: the conversation is empty")

        return self._reply(drop_reply)

    def undo(self) -> int | None:
        """Forget the last user message and its reply; the number of tokens they took (None: nothing to undo)."""
        with self._exclusive():
            return self._undo()

    def _undo(self) -> int | None:
        if not self.messages:
            return None
        before = self.count_tokens()
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages:
            self.messages.pop()
        self.last = None  # its statistics are of a reply no longer in the conversation
        return before - self.count_tokens()

    def reset(self) -> None:
        with self._exclusive():
            self.messages.clear()
            self.last = None

    def cancel(self) -> None:
        """Stop the reply being streamed (safe from another thread); the session stays usable."""
        self._cancel.set()

    def _render(self) -> tuple[list[dict], list[str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        images = []
        for m in self.messages:
            msg = {"role": m["role"], "content": m["content"]}
            if m.get("images"):  # each image stays in the turn it was sent with
                images += m["images"]
                if MARKER not in m["content"]:
                    msg["content"] = MARKER * len(m["images"]) + m["content"]
            if "ids" in m:
                msg["ids"] = m["ids"]
            if m.get("tool_calls"):  # rendered as the call's text; its ids keep the cache matching
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in m["tool_calls"]]
            if m["role"] == "tool":
                msg["tool_call_id"] = m["tool_call_id"]
            msgs.append(msg)
        if self.tools is not None:
            msgs = chat_messages(msgs, self.tools)
        return msgs, images

    def _reply(self, change) -> Iterator[GenerationResponse]:
        """Stream a reply to the conversation as `change()` leaves it, holding the session meanwhile."""
        with self._exclusive():
            self._cancel.clear()
            before = list(self.messages)
            pieces, ids = [], []  # every response adds a piece: no pieces, nothing was said
            try:
                change()
                msgs, images = self._render()
                settings = self.settings
                if self.transcript:
                    settings = settings.replace(stop=settings.stop + (TRANSCRIPT_STOP,))
                if self.tools is not None:
                    settings = settings.replace(constraint=self.tools.constraint())
                for r in stream_generate(self.model, self.tokenizer, msgs, cache=self.cache, images=images or None,
                                         pan_and_scan=self.pan_and_scan, settings=settings, sampler=self.sampler,
                                         draft=self.draft, control_tokens=self.control_tokens,
                                         transcript=self.transcript):
                    pieces.append(r.text)
                    if r.token is not None:
                        ids.append(r.token)
                    if r.kept_tokens is not None:  # a stop string: the reply is the tokens before it
                        del ids[r.kept_tokens:]
                    self.last = r
                    yield r
                    if self._cancel.is_set():
                        break
            except BaseException:
                if not pieces:  # nothing was said: the conversation is as it was
                    self.messages[:] = before
                raise
            finally:  # a cancelled or interrupted reply keeps what was said so far
                if pieces:  # its ids go back into the next prompt as generated, so the cache matches it
                    reply = {"role": "assistant", "content": "".join(pieces).strip(), "images": [], "ids": ids}
                    calls = self.tools.parse(reply["content"]) if self.tools is not None else None
                    if calls:
                        reply["tool_calls"] = calls
                    self.messages.append(reply)

    def save(self, path: str | Path) -> None:
        """The conversation as JSON: roles, texts and image paths (token ids are not saved). Written
        to a temporary file and renamed: a full disk or a Ctrl-C leaves an earlier save whole."""
        messages = [{k: v for k, v in m.items() if k != "ids"} for m in self.messages]
        replace_file(Path(path).expanduser(), json.dumps({"system": self.system, "messages": messages}, indent=2) + "\n")

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one. Anything else (not JSON, nested too deep, too
        large, a FIFO or a device, the wrong shape) raises ValueError and changes nothing."""
        d = _read_saved(Path(path).expanduser())
        with self._exclusive():
            self.system, self.messages, self.last = d["system"], d["messages"], None


def _read_saved(path: Path) -> dict:
    """A saved conversation, checked: {"system": str | None, "messages": [{"role", "content", "images"}]}."""
    def bad(why):
        return ValueError(f"{path}: not a saved conversation ({why})")

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file")
        if st.st_size > MAX_SAVED_BYTES:
            raise bad(f"{st.st_size:,} bytes; a saved conversation is at most {MAX_SAVED_BYTES >> 20} MB")
        with open(path, "rb") as f:
            d = json.loads(f.read(MAX_SAVED_BYTES + 1))
    except OSError as e:
        raise bad(e.strerror or e) from None
    except RecursionError:
        raise bad("nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("messages"), list):
        raise bad('no "messages" list')
    system = d.get("system")
    if system is not None and not isinstance(system, str):
        raise bad('"system" is not text')
    messages = []
    for i, m in enumerate(d["messages"]):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            raise bad(f"message {i} is not a {want} message with text content")
        images = m.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise bad(f"message {i}: images must be a list of paths")
        messages.append({"role": want, "content": m["content"], "images": images})
    return {"system": system, "messages": messages}
