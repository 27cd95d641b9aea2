"""Sampling: pure functions over logits, and `Sampler` that chains them (made by settings.Sampling).

Order as in the reference: repetition penalty, temperature, top-k, top-p, min-p, then a draw.
Every filter maps logits (B, V) -> logits (B, V) with removed tokens at -inf. Temperature 0
is greedy. This module knows nothing about models or tokenizers.
"""

from __future__ import annotations

import mlx.core as mx

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: mx.array, tokens, penalty: float) -> mx.array:
    """Divide positive logits of already-seen tokens by `penalty`, multiply negative ones (CTRL paper).
    `tokens`: ids (a list, or an array that may still be lazy: nothing is read back from the device)."""
    if penalty == 1.0 or len(tokens) == 0:
        return logits
    idx = mx.array(tokens).reshape(1, -1).astype(mx.int32)
    idx = mx.broadcast_to(idx, (logits.shape[0], idx.shape[1]))
    seen = mx.take_along_axis(logits, idx, axis=-1)
    # A token seen twice is written twice with the same value: penalized once.
    return mx.put_along_axis(logits, idx, mx.where(seen > 0, seen / penalty, seen * penalty), axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)  # a partition, not a sort of all V
    return mx.where(logits >= kth, logits, NEG_INF)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability sums to at least p."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
    keep_sorted = before < p  # the top token always has 0 ahead of it
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, NEG_INF)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    threshold = min_p * mx.max(probs, axis=-1, keepdims=True)
    return mx.where(probs >= threshold, logits, NEG_INF)


def validate(temp: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float) -> None:
    if temp < 0:
        raise ValueError(f"temperature must be >= 0 (got {temp})")
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0 (got {top_k})")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top-p must be in (0, 1] (got {top_p})")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min-p must be in [0, 1) (got {min_p})")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0 (got {repetition_penalty})")


class Sampler:
    """`sampler(logits (B, V), history) -> token ids (B,)`, lazily: no value is read back, so the
    decode loop can queue the next step before this one's token is known. `history` (ids seen so
    far, a list or an array) matters only with a repetition penalty. A seeded sampler owns its
    random key: the same seed draws the same tokens alone or in a batch."""

    def __init__(self, temp, top_k, top_p, min_p, repetition_penalty, repetition_context, seed):
        # No defaults here: settings.Sampling owns them (make_sampler, Sampling.sampler()).
        validate(temp, top_k, top_p, min_p, repetition_penalty)
        self.temp, self.top_k, self.top_p, self.min_p = temp, top_k, top_p, min_p
        self.repetition_penalty, self.repetition_context = repetition_penalty, repetition_context
        self.key = mx.random.key(seed) if seed is not None else None

    @property
    def greedy(self) -> bool:
        """Plain argmax: rows with such samplers are sampled together."""
        return self.temp == 0 and self.repetition_penalty == 1.0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0

    def process(self, logits: mx.array, history=()) -> mx.array:
        """The logits the draw is made from (B, V), float32: penalty, temperature, filters."""
        logits = logits.astype(mx.float32)
        if self.uses_history:
            recent = history[-self.repetition_context :] if len(history) else history
            logits = apply_repetition_penalty(logits, recent, self.repetition_penalty)
        if self.temp == 0:
            return logits
        logits = logits / self.temp
        if 0 < self.top_k < logits.shape[-1] and (self.top_p < 1.0 or self.min_p > 0.0):
            # Top-p and min-p only ever see the k survivors: filter those k, not all 262K (a sort of
            # the whole vocabulary costs more than the 270M's decode step on a CPU).
            idx = mx.argpartition(-logits, self.top_k - 1, axis=-1)[..., : self.top_k]
            kept = apply_min_p(apply_top_p(mx.take_along_axis(logits, idx, axis=-1), self.top_p), self.min_p)
            return mx.put_along_axis(mx.full(logits.shape, NEG_INF), idx, kept, axis=-1)
        return apply_min_p(apply_top_p(apply_top_k(logits, self.top_k), self.top_p), self.min_p)

    def probs(self, logits: mx.array, history=()) -> mx.array:
        """The distribution a token is drawn from (B, V): what speculative decoding must preserve."""
        return mx.softmax(self.process(logits, history), axis=-1)

    def next_key(self):
        """A fresh random key (None when unseeded: MLX's global generator is used)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def __call__(self, logits: mx.array, history=()) -> mx.array:
        logits = self.process(logits, history)
        if self.temp == 0:
            return mx.argmax(logits, axis=-1)
        return mx.random.categorical(logits, axis=-1, key=self.next_key())
