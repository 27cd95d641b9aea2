"""Batched prefill: several prompts' next chunks in one forward pass, each row at its own position.

The engine (engine.py) picks the rows and the pass length L; `Fill` is one prompt's progress and
`run_rows` runs one pass. Rows are text-only prompts (a prompt with images keeps the one-row path
in prompt_cache.py, whose chunks never cut an image block). Each row brings its own PromptCache:
their layers are merged into one batch (cache.py merge: every row keeps its own offset, so the
masks and RoPE positions are per row), and each row gets its layers back after the pass.

A row whose chunk is shorter than L is padded at the end with at most `max_pad` tokens, which the
caches then take back exactly (a window ring's `rollback` covers them: a pad overwrites only slots
the window already excludes). So several prompts of nearly the same length finish in one pass, and
prompts of very different lengths share passes of the shortest one's length, with no wasted work.
Only the last real position of each finishing row goes through the output head.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from . import forward
from .adapters import select
from .cache import WindowCache
from .prompt_cache import PromptCache

PAD = 0  # <pad>: what a padded position holds (its keys are taken back, never seen by a real query)


class Fill:
    """One prompt being prefilled: its ids (after PromptCache.begin) and how far the cache holds them."""

    def __init__(self, cache: PromptCache, prompt: list[int]):
        self.cache = cache
        self.ids, self.pos, _, _, _, self.logits = cache.begin(prompt)  # logits: the whole prompt was cached

    def need(self, chunk: int) -> int:
        """Tokens up to the end of the next chunk: at most `chunk`, ending at a branch point if one comes first."""
        stops = [m for m in self.cache.marks if self.pos < m < len(self.ids)] + [len(self.ids), self.pos + chunk]
        return min(stops) - self.pos

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ids)


def plan(needs: list[int], max_pad: int) -> int:
    """The pass length for rows needing `needs` tokens: the longest need within `max_pad` of the
    shortest (rows needing more take that many; rows needing less are padded by at most max_pad)."""
    shortest = min(needs)
    return max(n for n in needs if n <= shortest + max_pad)


def run_rows(model, fills: list[Fill], length: int) -> list[mx.array | None]:
    """One forward pass over the rows: each takes min(need, length) tokens of its prompt. Returns,
    per row, the logits (1, V) after its last prompt token when this pass finished its prompt, else None."""
    chunks = [f.ids[f.pos : f.pos + length] for f in fills]
    finishing = [f.pos + len(c) == len(f.ids) for f, c in zip(fills, chunks)]
    if len(fills) == 1:  # one row: the PromptCache's own path, exactly as a prompt alone
        f = fills[0]
        out = f.cache.feed(chunks[0], "last" if finishing[0] else "none")
        return [_advance(f, len(chunks[0]), out)]
    B, L = len(fills), max(len(c) for c in chunks)
    pads = [L - len(c) for c in chunks]
    layers = _merged([f.cache.layers for f in fills])
    select(model, [f.cache.adapter for f in fills])
    ids = mx.array([c + [PAD] * p for c, p in zip(chunks, pads)])
    logits = None
    if any(finishing):  # the head at each row's last real position: (B, V)
        logits = forward.logits(model, ids, layers, at=mx.array([len(c) - 1 for c in chunks]))[:, 0, :]
    else:
        forward.hidden(model, ids, layers)
    if any(pads):
        for c in layers:
            c.trim(pads)
    out = []
    for i, (f, c) in enumerate(zip(fills, chunks)):
        f.cache.hand_back([x.select([i]) for x in layers], f.cache.tokens + c)
        out.append(_advance(f, len(c), logits[i : i + 1] if finishing[i] else None))
    return out


def _advance(f: Fill, n: int, logits):
    """The row's cache now holds n more of its prompt's tokens."""
    f.pos += n
    if f.pos in f.cache.marks:
        f.cache.snapshot()  # a branch point: other conversations may start from here
    return logits


def _merged(rows: list[list]) -> list:
    """The rows' per-layer caches as one batch (a row with nothing cached yet gets empty storage of
    the others' shape; when no row holds anything, an empty cache of B rows)."""
    out = []
    for per_row in zip(*rows):
        held = [c for c in per_row if c.keys is not None]
        if not held:
            c = copy.copy(per_row[0])
            c.offsets = [0] * len(per_row)
            if isinstance(c, WindowCache):
                c.his = [0] * len(per_row)
            out.append(c)
            continue
        for c in per_row:
            if c.keys is None:
                c.keys, c.values = _empty_like(held[0].keys, c), _empty_like(held[0].values, c)
        out.append(per_row[0].merge(*per_row[1:]))  # one copy of every row
    return out


def _empty_like(a, cache):
    """Storage for a cache holding nothing: a ring of zeros (slots beyond the offset are never seen),
    or a global cache of no slots (it grows on the first write)."""
    if isinstance(a, tuple):
        return tuple(_empty_like(x, cache) for x in a)
    return mx.zeros_like(a) if isinstance(cache, WindowCache) else a[..., :0, :]


def feed_rows(model, caches: list[PromptCache], chunks: list[list[int]]) -> list[mx.array]:
    """Each row's tokens run on its own cache, all rows in one pass (speculative rounds checking
    several rows' guesses at once): per row the logits of every position, (len(chunk), V). Shorter
    rows are padded at the end (by at most the caches' rollback, taken back at once)."""
    B, L = len(caches), max(len(c) for c in chunks)
    pads = [L - len(c) for c in chunks]
    layers = _merged([pc.layers for pc in caches])
    select(model, [pc.adapter for pc in caches])
    logits = forward.logits(model, mx.array([c + [PAD] * p for c, p in zip(chunks, pads)]), layers)  # (B, L, V)
    if any(pads):
        for c in layers:
            c.trim(pads)
    for i, (pc, chunk) in enumerate(zip(caches, chunks)):
        pc.hand_back([c.select([i]) for c in layers], pc.tokens + chunk)
    return [logits[i, : len(c)] for i, c in enumerate(chunks)]
