"""A pool of prompt caches for many conversations at once, bounded by bytes (least recently used out).

A server does not know which conversation a request continues: `take(ids)` lends out the idle cache
that keeps the most of `ids` (a conversation extended, or its last turn edited or regenerated: the
PromptCache rolls back to its nearest snapshot), or a fresh one when none would keep at least half
of what it holds, so an unrelated request (sharing a BOS, a chat header, a system prompt with no
snapshot after it) never destroys another conversation's cache. A cache lent out is not in the pool;
`give` puts it back, and the least recently used caches are dropped while the pool holds more than
`max_bytes` (KV, snapshots and encoded images all counted).

Clients send replies back as text, and text re-encoded need not give the ids the model generated
(nor what the cache holds): `remember(text, ids)` keeps recent replies' ids, and `reply_ids(text)`
gives them back for the next prompt. Not thread-safe: one thread (the engine's) owns a pool.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from .adapters import resolve
from .cache import WindowCache
from .prompt_cache import PromptCache


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
    """How many tokens of `ids` a cache would keep: the common prefix when its rings can take the rest
    back, else its nearest snapshot at or before the common prefix (as PromptCache.rewind does)."""
    common = common_prefix(pc.tokens, ids)
    drop = len(pc.tokens) - common
    if drop == 0 or all(c.can_trim() >= drop for c in pc.layers if isinstance(c, WindowCache)):
        return common
    return max((s for s in pc.snapshots if s <= common), default=0)


class CachePool:
    def __init__(self, model, max_bytes: int, *, reply_bytes: int = 32 << 20, measure=cache_bytes, **cache_args):
        """`measure(cache) -> bytes`: what a cache counts against `max_bytes` (a server split across
        ranks counts the largest rank's share, so every rank evicts the same caches)."""
        if max_bytes < 0:
            raise ValueError(f"the cache pool's size must be >= 0 (got {max_bytes})")
        self.model, self.max_bytes, self.cache_args, self.measure = model, max_bytes, cache_args, measure
        self.idle: OrderedDict[int, tuple[PromptCache, int]] = OrderedDict()  # id -> (cache, bytes), LRU first
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._replies: OrderedDict[str, array] = OrderedDict()  # reply text -> its ids (int32)
        self.reply_bytes, self._reply_size = reply_bytes, 0  # bound on the texts and ids remembered

    def __len__(self) -> int:
        return len(self.idle)

    def take(self, ids: list[int], adapter: str | None = None) -> PromptCache:
        """The idle cache keeping the most of `ids` (removed from the pool), or a new one."""
        best, kept = None, 0
        adapter = resolve(self.model, adapter)  # a LoRA adapter's caches serve only that adapter
        for key, (pc, _) in self.idle.items():
            if pc.adapter != adapter:
                continue
            k = kept_prefix(pc, ids)
            if k > kept and 2 * k >= len(pc.tokens):  # most of it is kept: the same conversation
                best, kept = key, k
        if best is None:
            self.misses += 1
            return PromptCache(self.model, **self.cache_args, adapter=adapter)
        self.hits += 1
        pc, size = self.idle.pop(best)
        self.bytes -= size
        return pc

    def give(self, pc: PromptCache) -> None:
        """Put a cache back (most recently used); drop the least recently used beyond `max_bytes`."""
        if not pc.tokens:
            return
        size = self.measure(pc)
        self.idle[id(pc)] = (pc, size)
        self.bytes += size
        while self.bytes > self.max_bytes and self.idle:
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
