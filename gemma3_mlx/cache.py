"""Per-layer KV caches for one sequence or a batch of them (rows), each row at its own position.

Every cache has `offsets` (tokens held, one per row, host ints: known without asking the device),
`rope_offset` (an int, or one offset per row), `make_mask(L)` (the boolean mask matching what the
next `update_and_fetch` returns, None when nothing needs masking), `update_and_fetch(k, v)`,
`trim(n)` (drop the last n tokens exactly), `merge`/`select` (rows join and leave a batch) and
`state`/`restore` for snapshots and files (one row). Masks come from absolute positions, so rows
of different lengths share one batched attention.

Local layers keep a ring of window-1+K slots: the window-1 keys the next query needs plus K more,
so rolling back up to K tokens (speculative decoding, stop strings, the token queued after a stop)
moves the write position back with no copy and loses nothing a later query sees. Global layers keep
the whole context, optionally quantized (`kv_bits`). The model picks the kind per layer.
"""

from __future__ import annotations

import mlx.core as mx

ROLLBACK = 8  # tokens a window ring can take back by default


def _mask(q_pos: mx.array, k_pos: mx.array, window: int | None) -> mx.array:
    """(B, 1, L, T) boolean from q_pos (B, L) and k_pos (B, T): causal, keys >= 0 (negative marks an
    empty slot), and within the window, which includes the current token: p sees p-W+1 .. p."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def _uniform(offsets: list[int]) -> bool:
    return min(offsets) == max(offsets)


def _put(store: mx.array, new: mx.array, starts: list[int], size: int | None = None) -> None:
    """Write new (B, H, n, D) into store (B, H, C, D) at slot starts[b] (+i, modulo `size` for rings),
    in place. Equal starts take one or two slice writes; different starts one scatter."""
    n = new.shape[2]
    if _uniform(starts):
        s = starts[0] if size is None else starts[0] % size
        first = n if size is None else min(n, size - s)
        store[..., s : s + first, :] = new[..., :first, :]
        if first < n:  # the ring wraps: the rest goes to the front
            store[..., : n - first, :] = new[..., first:, :]
        return
    slots = mx.array(starts)[:, None] + mx.arange(n)[None]  # (B, n)
    if size is not None:
        slots = slots % size
    # Advanced indices on axes 0 and 2 put those axes first: the value is (B, n, H, D).
    store[mx.arange(len(starts))[:, None], :, slots] = new.transpose(0, 2, 1, 3)


class _Rows:
    """Bookkeeping shared by every cache kind: one offset per row."""

    offsets: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.offsets)

    @property
    def offset(self) -> int:
        """Tokens held, for a single-row cache."""
        if len(self.offsets) != 1:
            raise ValueError(f"offset is per row in a batch of {len(self.offsets)}: use offsets")
        return self.offsets[0]

    @property
    def rope_offset(self) -> int | mx.array:
        o = self.offsets
        return o[0] if _uniform(o) else mx.array(o)

    def _q_pos(self, L: int) -> mx.array:
        return mx.array(self.offsets)[:, None] + mx.arange(L)[None]


class KVCache(_Rows):
    """Full-context cache for global layers: slot = position, per row. Capacity grows by
    max(step, 1/4 of itself): amortized linear copying, at most a quarter (or a step) beyond."""

    step = 256

    def __init__(self, max_context: int | None = None, batch: int = 1):
        self.keys = self.values = None
        self.offsets = [0] * batch
        self.max_context = max_context  # preallocate once when known

    # -- storage (QuantizedKVCache overrides these three)
    def _arrays(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def _store(self, k: mx.array, v: mx.array) -> list[tuple[mx.array, mx.array]]:
        """(store, new) pairs for the given keys and values."""
        return [(self.keys, k), (self.values, v)]

    def _empty(self, k: mx.array, v: mx.array, n: int) -> tuple:
        B, H, _, D = k.shape
        return mx.zeros((B, H, n, D), k.dtype), mx.zeros((B, H, n, v.shape[3]), v.dtype)

    def _capacity(self) -> int:
        return 0 if self.keys is None else _leaves(self._arrays())[0].shape[2]

    def _new_capacity(self, needed: int) -> int:
        cap = self._capacity()
        new = max(needed, cap + max(self.step, cap // 4))
        if self.max_context:
            new = max(needed, min(new, self.max_context))
        return -(-new // self.step) * self.step

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        gk, gv = self._empty(k, v, self._new_capacity(needed) - self._capacity())
        if self.keys is None:
            self.keys, self.values = gk, gv
        else:
            self.keys, self.values = _cat([self.keys, gk], 2), _cat([self.values, gv], 2)

    def make_mask(self, L: int) -> mx.array | None:
        if L == 1 and _uniform(self.offsets):
            return None  # every held key is visible to a single query
        return _mask(self._q_pos(L), mx.arange(max(self.offsets) + L)[None], None)

    def update_and_fetch(self, k, v):
        # k, v: (B, n_kv_heads, L, head_dim)
        L = k.shape[2]
        end = max(self.offsets) + L
        if end > self._capacity():
            self._grow(k, v, end)
        for store, new in self._store(k, v):
            _put(store, new, self.offsets)
        self.offsets = [o + L for o in self.offsets]
        return _head(self.keys, end), _head(self.values, end)

    def trim(self, n: int | list[int]) -> None:
        """Forget the last n tokens of each row (the storage stays; it is overwritten)."""
        ns = n if isinstance(n, list) else [n] * len(self.offsets)
        self.offsets = [max(0, o - k) for o, k in zip(self.offsets, ns)]

    def merge(self, *others: "KVCache") -> "KVCache":
        """A new cache holding this cache's rows, then the others' (one copy, however many)."""
        caches = (self, *others)
        out = self._like([o for c in caches for o in c.offsets])
        cap = max(c._capacity() for c in caches)
        out.keys = _cat([_pad(c.keys, cap) for c in caches], 0)
        out.values = _cat([_pad(c.values, cap) for c in caches], 0)
        return out

    def select(self, rows: list[int]) -> "KVCache":
        out = self._like([self.offsets[r] for r in rows])
        idx = mx.array(rows)
        out.keys, out.values = _take(self.keys, idx), _take(self.values, idx)
        return out

    def _like(self, offsets: list[int]) -> "KVCache":
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.offsets = list(offsets)
        return out

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        return {"keys": self.keys[..., : self.offset, :], "values": self.values[..., : self.offset, :]}

    def restore(self, state: dict, offset: int) -> None:
        self.keys, self.values = state.get("keys"), state.get("values")
        self.offsets = [offset]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _leaves(self._arrays()))


class QuantizedKVCache(KVCache):
    """A global-layer cache holding keys and values in MLX affine quantization (bits may differ:
    keys are the more sensitive). Attention reads it with quantized matmuls (model.py), never
    materializing a float copy of the whole cache. keys/values are (packed, scales, biases)."""

    NAMES = ("packed", "scales", "biases")

    def __init__(self, key_bits: int = 8, value_bits: int = 8, group_size: int = 64,
                 max_context: int | None = None, batch: int = 1):
        super().__init__(max_context, batch)
        self.key_bits, self.value_bits, self.group_size = key_bits, value_bits, group_size

    def _store(self, k, v):
        qk = mx.quantize(k, group_size=self.group_size, bits=self.key_bits)
        qv = mx.quantize(v, group_size=self.group_size, bits=self.value_bits)
        return list(zip(self.keys, qk)) + list(zip(self.values, qv))

    def _empty(self, k, v, n):
        def empty(x, bits):
            B, H, _, D = x.shape
            return (mx.zeros((B, H, n, D * bits // 32), mx.uint32), mx.zeros((B, H, n, D // self.group_size), x.dtype),
                    mx.zeros((B, H, n, D // self.group_size), x.dtype))

        return empty(k, self.key_bits), empty(v, self.value_bits)

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        out = {f"keys.{n}": a[..., : self.offset, :] for n, a in zip(self.NAMES, self.keys)}
        out.update({f"values.{n}": a[..., : self.offset, :] for n, a in zip(self.NAMES, self.values)})
        return out

    def restore(self, state: dict, offset: int) -> None:
        if state:
            self.keys = tuple(state[f"keys.{n}"] for n in self.NAMES)
            self.values = tuple(state[f"values.{n}"] for n in self.NAMES)
        self.offsets = [offset]


class WindowCache(_Rows):
    """Ring buffer for local layers, allocated once: window-1+K slots per row.

    Slot s holds the newest position p written with p % size == s; the position of every slot
    follows from the row's offset alone, so nothing but the offset moves on a rollback. A slot that
    a rolled-back token overwrote is labelled with a position the window already excludes.
    Chunks of at most K tokens are written first and attend over the ring; longer chunks (prefill)
    attend over the ring plus themselves, so a window of W is exact at any chunk size.
    `his` (per row) is the furthest position ever written: rollback may go back to his - K.
    """

    def __init__(self, window: int, rollback: int = ROLLBACK, batch: int = 1):
        self.window, self.rollback = window, rollback
        self.size = max(window - 1 + rollback, 1)
        self.keys = self.values = None
        self.offsets = [0] * batch
        self.his = [0] * batch

    def _labels(self, ends: list[int]) -> mx.array:
        """(B, size) absolute position held by each slot when rows hold `ends` tokens (-1: empty)."""
        last = mx.array(ends)[:, None] - 1
        pos = last - ((last - mx.arange(self.size)[None]) % self.size)
        return mx.where(pos >= 0, pos, -1)

    def _in_order(self, L: int) -> bool:
        """No row has ever gone past the ring: slot s holds position s."""
        return max(max(self.his), max(self.offsets) + L) <= self.size

    def make_mask(self, L: int) -> mx.array | None:
        o = self.offsets
        q = self._q_pos(L)
        if L <= self.rollback:  # written first, then attend over the ring
            ends = [x + L for x in o]
            if self._in_order(L):
                if L == 1 and _uniform(o) and o[0] + 1 <= self.window:
                    return None
                return _mask(q, mx.arange(max(ends))[None], self.window)
            return _mask(q, self._labels(ends), self.window)
        if self._in_order(0):  # slot = position; slots at or past a row's offset hold nothing of it
            ring = mx.arange(max(o))[None]
            ring = mx.where(ring < mx.array(o)[:, None], ring, -1)
        else:
            ring = self._labels(o)
        return _mask(q, mx.concatenate([ring, q], axis=1), self.window)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, H, L, D = k.shape
        if self.keys is None:
            self.keys = mx.zeros((B, H, self.size, D), k.dtype)
            self.values = mx.zeros((B, H, self.size, v.shape[3]), v.dtype)
        o = self.offsets
        if L <= self.rollback:
            in_order = self._in_order(L)
            self._write(k, v, o)
            n = max(o) + L if in_order else self.size
            keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        else:
            n = max(o) if self._in_order(0) else self.size
            keys = mx.concatenate([self.keys[..., :n, :], k], axis=2)
            values = mx.concatenate([self.values[..., :n, :], v], axis=2)
            self._write(k, v, o)
        self.offsets = [x + L for x in o]
        self.his = [max(h, x) for h, x in zip(self.his, self.offsets)]
        return keys, values

    def _write(self, k, v, offsets):
        # The newest min(L, size) keys go into their slots.
        L = k.shape[2]
        n = min(L, self.size)
        starts = [x + L - n for x in offsets]
        _put(self.keys, k[..., L - n :, :], starts, self.size)
        _put(self.values, v[..., L - n :, :], starts, self.size)

    def can_trim(self) -> int:
        """Tokens every row can still take back exactly."""
        return min(o - max(h - self.rollback, 0) for o, h in zip(self.offsets, self.his))

    def trim(self, n: int | list[int]) -> None:
        ns = n if isinstance(n, list) else [n] * len(self.offsets)
        for o, h, k in zip(self.offsets, self.his, ns):
            if k > o - max(h - self.rollback, 0):
                raise ValueError(f"a window cache can take back {self.rollback} tokens past its furthest "
                                 f"position; asked for {k} at {o} (furthest {h})")
        self.offsets = [o - k for o, k in zip(self.offsets, ns)]

    def merge(self, *others: "WindowCache") -> "WindowCache":
        caches = (self, *others)
        if any(c.size != self.size for c in others):
            raise ValueError("window caches of different sizes cannot share a batch")
        out = self._like([o for c in caches for o in c.offsets], [h for c in caches for h in c.his])
        out.keys, out.values = _cat([c.keys for c in caches], 0), _cat([c.values for c in caches], 0)
        return out

    def select(self, rows: list[int]) -> "WindowCache":
        out = self._like([self.offsets[r] for r in rows], [self.his[r] for r in rows])
        idx = mx.array(rows)
        out.keys, out.values = _take(self.keys, idx), _take(self.values, idx)
        return out

    def _like(self, offsets, his) -> "WindowCache":
        out = object.__new__(WindowCache)
        out.__dict__.update(self.__dict__)
        out.offsets, out.his = list(offsets), list(his)
        return out

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        return {"keys": self.keys, "values": self.values, "furthest": mx.array([self.his[0]])}

    def restore(self, state: dict, offset: int) -> None:
        self.keys, self.values = state.get("keys"), state.get("values")
        self.offsets = [offset]
        furthest = state.get("furthest")
        self.his = [max(offset, int(furthest.item())) if furthest is not None else offset]
        if self.keys is not None and self.keys.shape[2] != self.size:
            raise ValueError(f"a window cache of {self.keys.shape[2]} slots does not fit a ring of {self.size}")

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _leaves(arrays) -> list[mx.array]:
    out = []
    for a in arrays:
        out += list(a) if isinstance(a, tuple) else [a]
    return out


def _cat(arrays: list, axis: int):
    if isinstance(arrays[0], tuple):
        return tuple(mx.concatenate(list(parts), axis=axis) for parts in zip(*arrays))
    return mx.concatenate(arrays, axis=axis)


def _pad(a, cap: int):
    """Grow axis 2 to `cap` slots with zeros (the new slots lie past every row's offset)."""
    if isinstance(a, tuple):
        return tuple(_pad(x, cap) for x in a)
    if a.shape[2] == cap:
        return a
    return mx.concatenate([a, mx.zeros((*a.shape[:2], cap - a.shape[2], a.shape[3]), a.dtype)], axis=2)


def _take(a, idx: mx.array):
    return tuple(x[idx] for x in a) if isinstance(a, tuple) else a[idx]


def _head(a, n: int):
    return tuple(x[..., :n, :] for x in a) if isinstance(a, tuple) else a[..., :n, :]


def kv_bytes(config, context: int, *, bytes_per_value: float = 2, kv_bits: int | None = None,
             group_size: int = 64, full: bool = False, rollback: int = ROLLBACK, layers=None,
             kv_heads: int | None = None) -> int:
    """KV-cache bytes a text config needs at `context` tokens (batch 1).

    full=True: every layer keeps the whole context (what runtimes without window caches do).
    Otherwise local layers hold window-1+rollback tokens; with kv_bits the global layers are
    quantized (plus a 16-bit scale and bias per group). `layers`, `kv_heads`: only those layers
    and that many KV heads each (one rank's share)."""
    t = config.text if hasattr(config, "text") else config
    per_token_values = 2 * (t.num_key_value_heads if kv_heads is None else kv_heads) * t.head_dim
    kinds = [t.is_local[i] for i in (range(len(t.is_local)) if layers is None else layers)]
    n_local = sum(kinds)
    n_global = len(kinds) - n_local
    if full:
        return int(len(kinds) * context * per_token_values * bytes_per_value)
    local = n_local * min(context, t.sliding_window - 1 + rollback) * per_token_values * bytes_per_value
    if kv_bits:
        glob = n_global * context * per_token_values * (kv_bits / 8 + 4 / group_size)
    else:
        glob = n_global * context * per_token_values * bytes_per_value
    return int(local + glob)
