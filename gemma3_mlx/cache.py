"""Per-layer KV caches: a growing cache for global layers, a ring buffer for local layers.

Each cache has an `offset` (tokens seen so far), `nbytes` (memory held), `make_mask(L)` (the
boolean mask matching what the next `update_and_fetch` returns), `update_and_fetch(k, v)`, and
`state`/`restore` so a prompt cache can be saved, snapshotted and rolled back (prompt_cache.py).
Local layers keep only the last window-1 keys: 5 of every 6 Gemma 3 layers stay small at any
context. Global layers may quantize their keys/values (`kv_bits`). The model picks the kind.
"""

from __future__ import annotations

import mlx.core as mx


def _mask(q_pos: mx.array, k_pos: mx.array, window: int | None) -> mx.array:
    """(L, Lk) boolean: causal, and within the window, which includes the current token:
    a query at p sees keys p-W+1 .. p. Negative key positions mark empty slots."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def _restore(self, state: dict, offset: int) -> None:
    """Shared by the float caches: put back what `state` returned."""
    self.keys, self.values = state.get("keys"), state.get("values")
    self.offset = offset


def _nbytes(self) -> int:
    return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class KVCache:
    """Full-context cache for global layers. Capacity grows by max(step, 1/4 of itself): amortized
    linear copying, and at most a quarter (or one step) beyond what is held."""

    step = 256

    def __init__(self, max_context: int | None = None):
        self.keys = self.values = None
        self.offset = 0
        self.max_context = max_context  # preallocate once when known

    def make_mask(self, L: int) -> mx.array | None:
        if L == 1:
            return None
        return _mask(mx.arange(self.offset, self.offset + L), mx.arange(self.offset + L), None)

    def _capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _new_capacity(self, needed: int) -> int:
        cap = self._capacity()
        new = max(needed, cap + max(self.step, cap // 4))
        if self.max_context:
            new = max(needed, min(new, self.max_context))
        return -(-new // self.step) * self.step

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        cap, new = self._capacity(), self._new_capacity(needed)
        B, H, _, D = k.shape
        grow_k = mx.zeros((B, H, new - cap, D), k.dtype)
        grow_v = mx.zeros((B, H, new - cap, v.shape[3]), v.dtype)
        if self.keys is None:
            self.keys, self.values = grow_k, grow_v
        else:
            self.keys = mx.concatenate([self.keys, grow_k], axis=2)
            self.values = mx.concatenate([self.values, grow_v], axis=2)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        # k, v: (B, n_kv_heads, L, head_dim)
        end = self.offset + k.shape[2]
        if end > self._capacity():
            self._grow(k, v, end)
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> None:
        """Forget everything after the first n tokens (the storage stays; it is overwritten)."""
        self.offset = min(self.offset, n)

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        return {"keys": self.keys[..., : self.offset, :], "values": self.values[..., : self.offset, :]}

    restore = _restore
    nbytes = property(_nbytes)


class QuantizedKVCache(KVCache):
    """A global-layer cache holding keys and values in MLX affine quantization (bits may differ:
    keys are the more sensitive). Attention reads it with quantized matmuls (model.py), never
    materializing a float copy of the whole cache."""

    def __init__(self, key_bits: int = 8, value_bits: int = 8, group_size: int = 64, max_context: int | None = None):
        super().__init__(max_context)
        self.key_bits, self.value_bits, self.group_size = key_bits, value_bits, group_size
        self.keys = self.values = None  # tuples (packed, scales, biases)

    def _capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _empty(self, B, H, n, D, bits, dtype):
        return (mx.zeros((B, H, n, D * bits // 32), mx.uint32), mx.zeros((B, H, n, D // self.group_size), dtype),
                mx.zeros((B, H, n, D // self.group_size), dtype))

    def _grow(self, k, v, needed):
        cap, new = self._capacity(), self._new_capacity(needed)
        B, H, _, D = k.shape
        gk = self._empty(B, H, new - cap, D, self.key_bits, k.dtype)
        gv = self._empty(B, H, new - cap, v.shape[3], self.value_bits, v.dtype)
        if self.keys is None:
            self.keys, self.values = gk, gv
        else:
            self.keys = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(self.keys, gk))
            self.values = tuple(mx.concatenate([a, b], axis=2) for a, b in zip(self.values, gv))

    def update_and_fetch(self, k, v):
        end = self.offset + k.shape[2]
        if end > self._capacity():
            self._grow(k, v, end)
        qk = mx.quantize(k, group_size=self.group_size, bits=self.key_bits)
        qv = mx.quantize(v, group_size=self.group_size, bits=self.value_bits)
        for store, new in ((self.keys, qk), (self.values, qv)):
            for a, b in zip(store, new):
                a[..., self.offset : end, :] = b
        self.offset = end
        return (tuple(a[..., :end, :] for a in self.keys), tuple(a[..., :end, :] for a in self.values))

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        names = ("packed", "scales", "biases")
        out = {f"keys.{n}": a[..., : self.offset, :] for n, a in zip(names, self.keys)}
        out.update({f"values.{n}": a[..., : self.offset, :] for n, a in zip(names, self.values)})
        return out

    def restore(self, state: dict, offset: int) -> None:
        names = ("packed", "scales", "biases")
        if state:
            self.keys = tuple(state[f"keys.{n}"] for n in names)
            self.values = tuple(state[f"values.{n}"] for n in names)
        self.offset = offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


class WindowCache:
    """Ring buffer for local layers, allocated once: the last `window - 1` keys and values.

    A step attends over the ring plus its own keys (window-1 + L, never more), so a sliding
    window of W (current token included) is exact at any chunk size, even chunks larger than W.
    Slot s holds the position p with p % (window-1) == s; the mask is built from positions, so
    the slots need no reordering.
    """

    def __init__(self, window: int):
        self.window = window
        self.size = max(window - 1, 1)
        self.keys = self.values = None
        self.offset = 0

    def _slot_positions(self) -> mx.array:
        """Absolute position held by each slot (-1 for slots not yet written)."""
        s = mx.arange(self.size)
        last = self.offset - 1  # newest position held
        pos = last - ((last - s) % self.size)
        return mx.where(pos >= 0, pos, -1) if self.offset else mx.full((self.size,), -1)

    def make_mask(self, L: int) -> mx.array | None:
        if self.offset < self.size:  # not yet wrapped: held slots are in order
            held = self.offset
            k_pos = mx.arange(self.offset + L)
            if L == 1 and held < self.window:
                return None
            return _mask(mx.arange(self.offset, self.offset + L), k_pos, self.window)
        if L == 1:
            return None  # the ring holds exactly the window-1 keys a single query sees
        k_pos = mx.concatenate([self._slot_positions(), mx.arange(self.offset, self.offset + L)])
        return _mask(mx.arange(self.offset, self.offset + L), k_pos, self.window)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, H, L, D = k.shape
        if self.keys is None:
            self.keys = mx.zeros((B, H, self.size, D), k.dtype)
            self.values = mx.zeros((B, H, self.size, v.shape[3]), v.dtype)
        held = min(self.offset, self.size)
        if self.offset < self.size:
            keys = mx.concatenate([self.keys[..., :held, :], k], axis=2)
            values = mx.concatenate([self.values[..., :held, :], v], axis=2)
        else:
            keys = mx.concatenate([self.keys, k], axis=2)
            values = mx.concatenate([self.values, v], axis=2)
        # Write the newest min(L, size) keys into their slots (one or two contiguous pieces).
        n = min(L, self.size)
        start = (self.offset + L - n) % self.size
        first = min(n, self.size - start)
        self.keys[..., start : start + first, :] = k[..., L - n : L - n + first, :]
        self.values[..., start : start + first, :] = v[..., L - n : L - n + first, :]
        if first < n:
            self.keys[..., : n - first, :] = k[..., L - n + first :, :]
            self.values[..., : n - first, :] = v[..., L - n + first :, :]
        self.offset += L
        return keys, values

    @property
    def state(self) -> dict:
        return {} if self.keys is None else {"keys": self.keys, "values": self.values}

    restore = _restore
    nbytes = property(_nbytes)


def kv_bytes(config, context: int, *, bytes_per_value: float = 2, kv_bits: int | None = None,
             group_size: int = 64, full: bool = False) -> int:
    """KV-cache bytes a text config needs at `context` tokens (batch 1).

    full=True: every layer keeps the whole context (what runtimes without window caches do).
    Otherwise local layers hold window-1 tokens; with kv_bits the global layers are quantized
    (plus a 16-bit scale and bias per group)."""
    t = config.text if hasattr(config, "text") else config
    per_token_values = 2 * t.num_key_value_heads * t.head_dim
    n_local = sum(t.is_local)
    n_global = len(t.is_local) - n_local
    if full:
        return int(len(t.is_local) * context * per_token_values * bytes_per_value)
    local = n_local * min(context, t.sliding_window - 1) * per_token_values * bytes_per_value
    if kv_bits:
        glob = n_global * context * per_token_values * (kv_bits / 8 + 4 / group_size)
    else:
        glob = n_global * context * per_token_values * bytes_per_value
    return int(local + glob)
