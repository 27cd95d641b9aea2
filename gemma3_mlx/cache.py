"""Per-layer KV caches: a growing cache for global layers, a window cache for local layers.

Each cache has an `offset` (tokens seen so far), `nbytes` (memory held), `update_and_fetch`
(append this step's keys/values, return what attention should see) and `make_mask` (the
boolean mask matching what `update_and_fetch` will return). The model picks the kind per
layer. This module does not quantize the cache.
"""

from __future__ import annotations

import mlx.core as mx


def _mask(q_start: int, L: int, k_start: int, Lk: int, window: int | None) -> mx.array | None:
    """Causal (and sliding-window) boolean mask, shape (L, Lk); None when every key is visible.

    A window W includes the current token: a query at position p sees keys p-W+1 .. p.
    """
    q = mx.arange(q_start, q_start + L)[:, None]
    k = mx.arange(k_start, k_start + Lk)[None, :]
    causal_all = k_start + Lk - 1 <= q_start  # every key at or before the first query
    window_all = window is None or k_start > q_start + L - 1 - window
    if causal_all and window_all:
        return None
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


class KVCache:
    """Full-context cache for global layers. Grows in steps of `step` tokens (no per-token copies)."""

    step = 1024

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def make_mask(self, L: int) -> mx.array | None:
        return _mask(self.offset, L, 0, self.offset + L, None)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        # k, v: (B, n_kv_heads, L, head_dim)
        B, H, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end - (0 if self.keys is None else self.keys.shape[2])) + self.step - 1) // self.step * self.step
            zk = mx.zeros((B, H, grow, D), k.dtype)
            zv = mx.zeros((B, H, grow, v.shape[3]), v.dtype)
            if self.keys is None:
                self.keys, self.values = zk, zv
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], zk], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], zv], axis=2)
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class WindowCache:
    """Sliding-window cache for local layers: keeps only the last `window - 1` keys between calls.

    Attention at a step sees those plus the step's own keys, which is all a window of W
    (current token included) can reach.
    """

    def __init__(self, window: int):
        self.window = window
        self.keys = self.values = None
        self.offset = 0

    def _held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def make_mask(self, L: int) -> mx.array | None:
        held = self._held()
        return _mask(self.offset, L, self.offset - held, held + L, self.window)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
        self.offset += k.shape[2] - self._held()
        start = max(k.shape[2] - (self.window - 1), 0)
        self.keys, self.values = k[..., start:, :], v[..., start:, :]
        return k, v

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
