"""A chat with a model: `ChatSession` keeps the conversation and its prompt cache.

Each turn is rendered with Gemma's chat format and handed to `stream_generate` with the
session's `PromptCache`, so only the new tokens run; `retry` regenerates the last reply from a
cache snapshot (nothing re-processed), `undo` drops the last exchange, `cancel` (from any thread)
stops the reply being streamed. One sampler serves the whole session: a seed seeds it once, so a
retried reply is a new draw and a seeded session is reproducible as a whole. Conversations save
to JSON (images by path). No terminal I/O here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

from .generate import GenerationResponse, stream_generate
from .prompt import MARKER, prompt_ids
from .prompt_cache import PromptCache
from .speculate import DraftModel, PromptLookup
from .sample import make_sampler, validate

# The settings a session can change, with their defaults (those of stream_generate).
SETTINGS = {"temp": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": 256,
            "seed": None}
_SAMPLER_KEYS = ("temp", "top_k", "top_p", "min_p", "repetition_penalty")


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, pan_and_scan: bool = False, *,
                 draft_model=None, prompt_lookup: bool = False, **sampling):
        self.model, self.tokenizer = model, tokenizer
        # Speculative decoding: a draft model keeps its own prompt cache through the conversation.
        self.draft = DraftModel(draft_model) if draft_model is not None else PromptLookup() if prompt_lookup else None
        self.system = system
        self.pan_and_scan = pan_and_scan
        self.sampling: dict = {}  # max_tokens, temp, top_k, top_p, min_p, repetition_penalty, seed (see SETTINGS)
        self.set(**sampling)
        self.messages: list[dict] = []  # {"role": "user"|"assistant", "content": str, "images": [paths]}
        self.cache = PromptCache(model)
        self.last: GenerationResponse | None = None  # statistics of the last reply still in the conversation
        self._cancel = threading.Event()
        self._sampler, self._sampler_made_from = None, None

    @property
    def settings(self) -> dict:
        """Every sampling setting and max_tokens, defaults filled in."""
        return {**SETTINGS, **self.sampling}

    def set(self, **changes) -> None:
        """Change settings (temp, top_k, top_p, min_p, repetition_penalty, max_tokens, seed) from the next
        reply on. A new seed restarts the random stream; other changes keep it going."""
        unknown = set(changes) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))} (known: {', '.join(SETTINGS)})")
        s = {**self.settings, **changes}
        validate(*(s[k] for k in _SAMPLER_KEYS))
        if s["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {s['max_tokens']})")
        self.sampling.update(changes)

    @property
    def sampler(self):
        """The session's sampler, remade when a setting changed (keeping its random key unless the seed did)."""
        s = self.settings
        made_from = tuple(s[k] for k in _SAMPLER_KEYS) + (s["seed"],)
        if made_from != self._sampler_made_from:
            old, old_seed = self._sampler, self._sampler_made_from and self._sampler_made_from[-1]
            self._sampler = make_sampler(*made_from[:-1], seed=s["seed"])
            if old is not None and s["seed"] == old_seed:
                self._sampler.key = old.key  # the same random stream goes on
            self._sampler_made_from = made_from
        return self._sampler

    @property
    def greedy(self) -> bool:
        """Temperature 0: a retried reply is the same reply."""
        return self.settings["temp"] == 0

    def count_tokens(self) -> int:
        """Tokens the conversation takes as it stands (0 when empty; the system prompt joins the first turn)."""
        if not self.messages:
            return 0
        msgs, images = self._render()
        return len(prompt_ids(self.tokenizer, self.model.config, msgs, images or None, self.pan_and_scan)[0])

    def send(self, text: str, images=()) -> Iterator[GenerationResponse]:
        """Add a user message (and images) and stream the reply. If the reply fails before its first
        token (an unreadable image, a prompt longer than the context, Ctrl-C while the prompt is
        processed), the message is taken back, so the conversation stays usable."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text, "images": [str(i) for i in images]})
        return self._reply(before)

    def retry(self) -> Iterator[GenerationResponse]:
        """Regenerate the last reply."""
        before = list(self.messages)
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise ValueError("nothing to retry: the conversation is empty")
        return self._reply(before)

    def undo(self) -> int | None:
        """Forget the last user message and its reply; the number of tokens they took (None: nothing to undo)."""
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
            msgs.append(msg)
        return msgs, images

    def _reply(self, before: list[dict]) -> Iterator[GenerationResponse]:
        self._cancel.clear()
        msgs, images = self._render()
        pieces, ids = [], []  # every response adds a piece: no pieces, nothing was said
        try:
            for r in stream_generate(self.model, self.tokenizer, msgs, cache=self.cache, images=images or None,
                                     pan_and_scan=self.pan_and_scan, max_tokens=self.settings["max_tokens"],
                                     sampler=self.sampler, draft=self.draft):
                pieces.append(r.text)
                if r.token is not None:
                    ids.append(r.token)
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
                self.messages.append({"role": "assistant", "content": "".join(pieces).strip(), "images": [],
                                      "ids": ids})

    def save(self, path: str | Path) -> None:
        """The conversation as JSON: roles, texts and image paths (token ids are not saved)."""
        messages = [{k: v for k, v in m.items() if k != "ids"} for m in self.messages]
        Path(path).write_text(json.dumps({"system": self.system, "messages": messages}, indent=2) + "\n")

    def load(self, path: str | Path) -> None:
        try:
            d = json.loads(Path(path).read_text())
            messages = [{"role": m["role"], "content": str(m["content"]), "images": list(m.get("images", []))}
                        for m in d["messages"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a saved conversation ({e})") from None
        self.system, self.messages, self.last = d.get("system"), messages, None
