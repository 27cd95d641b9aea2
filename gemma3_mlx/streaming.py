"""One reply's tokens -> the text a reader may see now, with stop strings cut off.

`TextStream` is the one place generated tokens become streamed text: stream_generate (and so
ChatSession) and the server's worker all use it. Characters come out whole (tokenizer.py's
`StreamingDetokenizer`); with stop strings, the end of the text is held back only while it could
still be the start of one, and when one appears the text before it is the last piece: the stop
text itself is never emitted. `strip`: the reply's surrounding whitespace is dropped (a chat
transcript's reply starts with the space after "Assistant:" and ends with newlines before the next
"User:"); whitespace is then held back until something follows it. No engine, no sampling here: the caller stops the sequence when
`stopped` turns true.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from .tokenizer import StreamingDetokenizer


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = (), strip: bool = False):
        self.detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None  # None: ids only
        self.stop = tuple(s for s in stop if s)
        self.stopped = False  # a stop string ended the text
        self.tokens: list[int] = []  # every token added
        self._held = ""  # decoded, not yet emitted: it may be the start of a stop string
        self._ends: list[int] = []  # where each token's text ends, in characters of the whole text
        self._decoded = 0  # characters decoded so far
        self._sent = 0  # characters of the whole text passed on so far (whitespace `strip` holds included)
        self.strip, self._space, self._started = strip, "", False

    def add(self, token: int) -> str:
        """The text this token makes final ("" mid-character, while held back, or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        text = self.detok.add(token) if self.detok is not None else ""
        self._decoded += len(text)
        self._ends.append(self._decoded)
        return self._trim(self._cut(text))

    def finish(self) -> str:
        """The rest of the text once the sequence has ended (held text included, unless a stop cut it)."""
        if self.stopped:
            return ""
        text = self.detok.finalize() if self.detok is not None else ""
        self._decoded += len(text)
        out = self._cut(text)
        if not self.stopped:
            out, self._held = out + self._held, ""
            self._sent = self._decoded
        return self._trim(out)

    @property
    def kept(self) -> list[int]:
        """The tokens whose text was emitted whole: with a stop string, those before it."""
        return self.tokens[: bisect_right(self._ends, self._sent)]

    def _trim(self, out: str) -> str:
        if not self.strip:
            return out
        out = self._space + out
        if not self._started:
            out = out.lstrip()
            self._started = bool(out)
        body = out.rstrip()
        self._space = out[len(body):]
        return body

    def _cut(self, text: str) -> str:
        if not self.stop:
            self._sent += len(text)
            return text
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held, out = True, "", held[: min(hits)]
        else:
            keep = self._stop_prefix(held)
            self._held, out = held[len(held) - keep:], held[: len(held) - keep]
        self._sent += len(out)
        return out

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        for k in range(min(len(text), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
