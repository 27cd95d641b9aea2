"""Sampling: pure functions over logits, and `make_sampler` that chains them.

Order as in the reference: repetition penalty, temperature, top-k, top-p, min-p, then a draw.
Every filter maps logits (B, V) -> logits (B, V) with removed tokens at -inf. Temperature 0
is greedy. This module knows nothing about models or tokenizers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: mx.array, tokens: Sequence[int], penalty: float) -> mx.array:
    """Divide positive logits of already-seen tokens by `penalty`, multiply negative ones (CTRL paper)."""
    if penalty == 1.0 or len(tokens) == 0:
        return logits
    idx = mx.array(sorted(set(int(t) for t in tokens)))
    seen = logits[..., idx]
    logits = mx.array(logits)  # a new array: the caller's logits stay as they were
    logits[..., idx] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]
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


def make_sampler(
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context: int = 64,
    seed: int | None = None,
) -> Callable[[mx.array, Sequence[int]], mx.array]:
    """Return `sample(logits (B, V), history) -> token ids (B,)`. Temperature 0 means greedy."""
    validate(temp, top_k, top_p, min_p, repetition_penalty)
    state = {"key": mx.random.key(seed) if seed is not None else None}

    def sample(logits: mx.array, history: Sequence[int] = ()) -> mx.array:
        logits = logits.astype(mx.float32)
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, list(history)[-repetition_context:], repetition_penalty)
        if temp == 0:
            return mx.argmax(logits, axis=-1)
        logits = apply_min_p(apply_top_p(apply_top_k(logits / temp, top_k), top_p), min_p)
        if state["key"] is None:
            return mx.random.categorical(logits, axis=-1)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logits, axis=-1, key=sub)

    return sample
