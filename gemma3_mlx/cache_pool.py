"""A pool of prompt caches for many conversations at once, bounded by bytes (least recently used out).

A server does not know which conversation a request continues. `take(ids)` looks through every idle
cache for the longest prefix of `ids` it can give back exactly: the whole cache (a conversation
extended: that cache is lent out, nothing copied), or a point its window rings can reach (a
snapshot at a branch point: the end of a shared system prompt, of a prompt or of a reply; or the
live rings when they can take the rest back). A prefix shared with another conversation is *forked*:
a new cache gets that conversation's global layers by slice (read-only: the fork's first write grows
its own copy) and a copy of the snapshot's rings, so the other conversation's cache never changes.
A new conversation with a known system prompt therefore prefills only its own question, also past
the sliding window. A cache lent out is not in the pool; `give` puts it back, and the least recently
used caches are dropped while the pool holds more than `max_bytes` (KV, snapshots and encoded images
all counted; a fork's slices count in full).

Clients send replies back as text, and text re-encoded need not give the ids the model generated
(nor what the cache holds): `remember(text, ids)` keeps recent replies' ids, and `reply_ids(text)`
gives them back for the next prompt. Not thread-safe: one thread (the engine's) owns a pool.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from .adapters import resolve
from .prompt_cache import PromptCache

MIN_FORK = 32  # tokens: a shorter shared prefix (a BOS, a chat header) is not worth a fork


def cache_bytes(pc: PromptCache) -> int:
    """Memory a prompt cache holds: its layers, its snapshots (windows and logits) and encoded images."""
    total = pc.nbytes
    for states, logits in pc.snapshots.values():
        total += sum(v.nbytes for s in states if s for v in s.values())
        total += logits.nbytes if logits is not None else 0
    return total + sum(f.nbytes for f in pc._encoded.values())


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by bisection over slice comparisons (C speed: a pool compares a
    prompt with every idle conversation, often sharing a long system prompt)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def kept_prefix(pc: PromptCache, ids: list[int]) -> int:
    """How many tokens of `ids` a cache can give back exactly: the common prefix when its rings can
    take the rest back, else its nearest snapshot at or before the common prefix (as PromptCache.rewind)."""
    return _reach(pc, ids)[1]


def _reach(pc: PromptCache, ids: list[int]) -> tuple[int, int]:
    """(common prefix, what of it the cache can give back exactly)."""
    common = common_prefix(pc.tokens, ids)
    return common, pc.reach(common)


class CachePool:
    def __init__(self, model, max_bytes: int, *, reply_bytes: int = 32 << 20, measure=cache_bytes, **cache_args):
        """`measure(cache) -> bytes`: what a cache counts against `max_bytes` (a server split across
        ranks counts the largest rank's share, so every rank evicts the same caches)."""
        if max_bytes < 0:
            raise ValueError(f"the cache pool's size must be >= 0 (got {max_bytes})")
        self.model, self.max_bytes, self.cache_args, self.measure = model, max_bytes, cache_args, measure
        self.idle: OrderedDict[int, tuple[PromptCache, int]] = OrderedDict()  # id -> (cache, bytes), LRU first
        self.bytes = 0
        self.hits = self.misses = self.forks = self.evictions = 0
        self._replies: OrderedDict[str, array] = OrderedDict()  # reply text -> its ids (int32)
        self.reply_bytes, self._reply_size = reply_bytes, 0  # bound on the texts and ids remembered

    def __len__(self) -> int:
        return len(self.idle)

    def take(self, ids: list[int], adapter: str | None = None) -> PromptCache:
        """A cache for `ids` holding as much of it as any idle cache can give: that cache itself when
        `ids` extends all of it (removed from the pool), a fork of its prefix otherwise, or a new one.

        Where `ids` leaves a cached conversation with no snapshot there (two raw prompts sharing a
        long preamble, say), that point becomes a branch point of the cache returned: its prefill
        snapshots there, and the next prompt sharing the preamble forks from it."""
        best, kept, shared = None, 0, 0
        adapter = resolve(self.model, adapter)  # a LoRA adapter's caches serve only that adapter
        for key, (pc, _) in self.idle.items():
            if pc.adapter != adapter:
                continue
            common, k = _reach(pc, ids)
            shared = max(shared, common)
            if k > kept or (k == kept and k == len(pc.tokens)):  # ties: the one taken whole, no copy
                best, kept = key, k
        marks = frozenset([shared]) if kept < shared and MIN_FORK <= shared < len(ids) - 1 else frozenset()
        if best is not None and kept == len(self.idle[best][0].tokens):
            self.hits += 1
            out, size = self.idle.pop(best)
            self.bytes -= size
        elif best is not None and kept >= min(MIN_FORK, len(ids) - 1):
            self.forks += 1
            self.idle.move_to_end(best)  # shared: recently used
            out = self.idle[best][0].fork(kept)
        else:
            self.misses += 1
            out = PromptCache(self.model, **self.cache_args, adapter=adapter)
        out.marks = marks
        return out

    def give(self, pc: PromptCache) -> None:
        """Put a cache back (most recently used); drop the least recently used beyond `max_bytes`."""
        if not pc.tokens:
            return
        size = self.measure(pc)
        self.idle[id(pc)] = (pc, size)
        self.bytes += size
        self.shrink(self.max_bytes)

    def shrink(self, max_bytes: int) -> None:
        """Drop the least recently used caches until the pool holds at most `max_bytes` (the server's
        admission by memory makes room for a request this way)."""
        while self.bytes > max_bytes and self.idle:
            _, (_, dropped) = self.idle.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def clear(self) -> None:
        self.idle.clear()
        self.bytes = 0

    def remember(self, text: str, ids) -> None:
        """A reply as the client will see it, and the ids it was generated as."""
        key = text.strip()
        if not key:
            return
        self._forget(key)
        self._replies[key] = array("i", ids)
        self._reply_size += len(key) + 4 * len(ids)
        while self._reply_size > self.reply_bytes:
            self._forget(next(iter(self._replies)))

    def _forget(self, key: str) -> None:
        old = self._replies.pop(key, None)
        if old is not None:
            self._reply_size -= len(key) + 4 * len(old)

    def reply_ids(self, text: str) -> list[int] | None:
        ids = self._replies.get(text.strip())
        return ids.tolist() if ids is not None else None
