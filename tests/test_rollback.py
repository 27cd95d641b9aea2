"""Exact rollback: for every cache kind, feeding n tokens, taking back k and feeding k others equals
feeding the final sequence from scratch, across the ring's wrap points, alone and per row."""

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx

from gemma3_mlx.cache import WindowCache
from gemma3_mlx.prompt_cache import PromptCache
from test_engine import tiny_model

W, K = 6, 4


@pytest.fixture(scope="module")
def model():
    return tiny_model(W, seed=11)


def ids_of(n, seed):
    return np.random.default_rng(seed).integers(4, 512, n).tolist()


def feed(model, cache, ids, chunk):
    outs = [model(mx.array(ids[s : s + chunk])[None], cache) for s in range(0, len(ids), chunk)]
    return mx.concatenate(outs, axis=1)


def scratch(model, ids, tail, kv_bits, pieces=None):
    """Logits of the last `tail` positions of `ids` fed into a fresh cache. `pieces`: chunk sizes to
    feed in (quantized attention rounds differently at other chunk sizes, rollback or not)."""
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32, rollback=K)
    outs, at = [], 0
    for size, chunk in pieces or [(len(ids), len(ids))]:
        outs.append(feed(model, cache, ids[at : at + size], chunk))
        at += size
    return np.array(mx.concatenate(outs, axis=1)[:, -tail:])


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
@pytest.mark.parametrize("n", [3, W, W + 1, W - 1 + K, 2 * W + 1, 3 * W + K + 2])  # around the wrap points
@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("chunk", [1, 7])
def test_trim_then_feed_equals_scratch(model, kv_bits, n, k, chunk):
    if k > n:
        pytest.skip("cannot take back more than was fed")
    ids, others = ids_of(n, n), ids_of(k, 100 + n)
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32, rollback=K)
    feed(model, cache, ids, chunk)
    for c in cache:
        c.trim(k)
        assert c.offset == n - k
    # The k others as one chunk (written into the ring first) and, after them, a longer chunk (appended).
    got = np.array(model(mx.array(others)[None], cache))
    extra = ids_of(2 * K + 1, 7)
    got2 = np.array(model(mx.array(extra)[None], cache))
    final = ids[: n - k] + others
    pieces = [(n - k, chunk), (k, k), (len(extra), len(extra))] if n > k else [(k, k), (len(extra), len(extra))]
    assert np.abs(got - scratch(model, final, k, kv_bits, pieces[:-1])).max() <= 1e-5
    assert np.abs(got2 - scratch(model, final + extra, len(extra), kv_bits, pieces)).max() <= 1e-5


@pytest.mark.parametrize("n", [W + 3, 2 * W + K])
def test_repeated_rollbacks_within_the_budget(model, n):
    """Take back 2, feed 1, take back 3 (speculative decoding rejecting twice): still exact."""
    ids = ids_of(n, 1)
    cache = model.make_cache(rollback=K)
    feed(model, cache, ids, 1)
    for c in cache:
        c.trim(2)
    model(mx.array([9])[None], cache)
    for c in cache:
        c.trim(3)
    final = ids[: n - 4]
    got = np.array(model(mx.array([5, 6])[None], cache))
    assert np.abs(got - scratch(model, final + [5, 6], 2, None)).max() <= 1e-5


def test_taking_back_more_than_the_ring_holds_is_refused(model):
    cache = model.make_cache(rollback=K)
    feed(model, cache, ids_of(3 * W, 2), 1)
    ring = next(c for c in cache if isinstance(c, WindowCache))
    assert ring.can_trim() == K
    with pytest.raises(ValueError, match="take back"):
        ring.trim(K + 1)
    ring.trim(K)
    assert ring.can_trim() == 0


def test_rows_roll_back_by_different_amounts(model):
    """A batch of 3 rows at different positions, each taking back its own k (rejected drafts)."""
    lengths, ks = [4, W + 2, 3 * W + 1], [1, K, 2]
    seqs = [ids_of(n, 20 + n) for n in lengths]
    rows = []
    for s in seqs:
        cache = model.make_cache(rollback=K)
        feed(model, cache, s[:-1], 5)
        rows.append(cache)
    batch = rows[0]
    for other in rows[1:]:
        batch = [a.merge(b) for a, b in zip(batch, other)]
    last = mx.array([[s[-1]] for s in seqs])
    model(last, batch)  # one batched step, every row at its own position
    for c in batch:
        c.trim(list(ks))
    nxt = [ids_of(3, 50 + i) for i in range(3)]
    got = np.array(model(mx.array(nxt), batch))  # (3, 3, V): rows at different positions again
    for i, (s, k) in enumerate(zip(seqs, ks)):
        want = scratch(model, s[: len(s) - k] + nxt[i], 3, None)
        assert np.abs(got[i : i + 1] - want).max() <= 1e-5, i


def test_prompt_cache_trim_past_the_ring_uses_a_snapshot(model):
    ids = ids_of(5 * W, 3)
    pc = PromptCache(model, rollback=K)
    pc.prefill(ids[: 2 * W])
    pc.snapshot()
    pc.prefill(ids)
    pc.trim(K - 1)  # within the rings: nothing re-processed
    assert pc.tokens == ids[: len(ids) - K + 1]
    pc.trim(3 * W - K + 1)  # past them: back to the snapshot, then forward exactly
    assert pc.tokens == ids[: 2 * W]
    got = np.array(pc.prefill(ids[: 2 * W] + [8, 9]))
    want = scratch(model, ids[: 2 * W] + [8, 9], 1, None)[:, -1]
    assert np.abs(got - want).max() <= 1e-5 and pc.reprocessed == 2


def test_a_long_chunk_interrupted_halfway_through_the_layers_falls_back_to_a_snapshot(model, monkeypatch):
    """Ctrl-C in the middle of a prefill chunk longer than the rings can take back: the layers that
    ran it cannot trim, so the cache returns to its snapshot and the next prefill is still exact."""
    ids = ids_of(6 * W, 4)
    pc = PromptCache(model, rollback=K)
    pc.prefill(ids[: 2 * W])
    pc.snapshot()
    layer = type(model.model.layers[2])
    real = layer.__call__
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # layers 0 and 1 have taken the chunk, layer 2 has not
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(layer, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        pc.prefill(ids, chunk=3 * W)  # chunks of 3W > K
    monkeypatch.undo()
    assert all(c.offset == len(pc.tokens) for c in pc.layers) and pc.tokens == ids[: len(pc.tokens)]
    got = np.array(pc.prefill(ids))
    assert np.abs(got - scratch(model, ids, 1, None)[:, -1]).max() <= 1e-5


def test_the_cache_keeps_tokens_and_layers_together(model):
    """PromptCache owns "its tokens are what its layers hold": layers handed back for other tokens are
    refused, tokens run unread count once settled, and a cache handed back goes on like a fresh one."""
    ids = ids_of(12, 3)
    fresh = PromptCache(model)
    want = np.array(fresh.feed(ids))  # logits after all 12, run in one piece
    pc = PromptCache(model)
    pc.feed(ids[:9])
    with pytest.raises(AssertionError, match="holding \\[9\\] tokens handed back for 8"):
        pc.hand_back(pc.layers, ids[:8])
    for t in ids[9:11]:
        pc.feed_unread(mx.array([t]))
    assert len(pc.tokens) == 9
    with pytest.raises(ValueError, match="1 tokens read back for 2 run"):
        pc.settle(ids[9:10])
    pc.settle(ids[9:11])
    assert pc.tokens == ids[:11]
    pc.hand_back(pc.layers, ids[:11])
    assert np.abs(np.array(pc.feed(ids[11:])) - want).max() <= 1e-5
