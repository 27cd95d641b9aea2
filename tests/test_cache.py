"""KV caches: window rings at every chunk size, growth, quantized global KV, prompt caches and rollback."""

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx

from conftest import FIXTURES
from gemma3_mlx.cache import KVCache, QuantizedKVCache, WindowCache, kv_bytes
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.loader import load_model
from gemma3_mlx.prompt_cache import PromptCache, PromptCacheError


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return {name: load_model(d, dtype="float32") for name, d in tiny_dirs.items()}


def random_ids(model, n, seed=0):
    return [2] + np.random.default_rng(seed).integers(4, model.config.text.vocab_size, n - 1).tolist()


def run_chunks(model, ids, chunk, cache=None):
    cache = model.make_cache() if cache is None else cache
    x = mx.array(ids)[None]
    return np.concatenate([np.array(model(x[:, s : s + chunk], cache)) for s in range(0, len(ids), chunk)], axis=1)


@pytest.mark.parametrize("name", ["tiny_v5", "tiny_v4"])
def test_chunked_prefill_and_decoding_equal_full_forward_over_many_windows(tiny, name):
    model = tiny[name]
    W = model.config.text.sliding_window
    ids = random_ids(model, 10 * W + 3)
    full = np.array(model(mx.array(ids)[None]))
    for chunk in (1, W - 1, W, W + 1, 3 * W):
        assert np.abs(run_chunks(model, ids, chunk) - full).max() <= 1e-5, chunk


@pytest.mark.parametrize("K", [0, 3])
def test_window_ring_holds_window_minus_one_plus_rollback(K):
    W, D = 6, 8
    c = WindowCache(W, rollback=K)
    size = W - 1 + K
    allk = mx.random.normal((1, 1, 40, D))
    seen = 0
    for L in (1, 3, 5, 6, 7, 13, 1, 1, 2):
        k, v = c.update_and_fetch(allk[..., seen : seen + L, :], allk[..., seen : seen + L, :])
        seen += L
        assert c.offset == seen and c.keys.shape[2] == size
        assert c.nbytes == 2 * size * D * 4
        # Chunks of up to K are written first and read from the ring; longer ones are appended to it.
        assert k.shape[2] == (min(seen, size) if L <= K else min(seen - L, size) + L)
        # The ring holds exactly the last window-1+K keys, each in slot position % size.
        held = np.array(c.keys[0, 0])
        for p in range(max(0, seen - size), seen):
            assert np.array_equal(held[p % size], np.array(allk[0, 0, p]))


def test_global_cache_grows_without_quadratic_copying():
    c = KVCache()
    grows, cap = 0, 0
    for _ in range(5000):
        c.update_and_fetch(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))
        if c.keys.shape[2] != cap:
            grows, cap = grows + 1, c.keys.shape[2]
    assert grows <= 12  # capacity grows by a quarter: logarithmically many copies
    assert c.keys.shape[2] <= max(5000 * 1.25, 5000 + KVCache.step)
    c2 = KVCache(max_context=3000)
    c2.update_and_fetch(mx.zeros((1, 1, 10, 4)), mx.zeros((1, 1, 10, 4)))
    assert c2.keys.shape[2] == 256


def test_cache_bytes_match_theory_for_4b_at_8k():
    cfg = ModelConfig.from_dict({"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "num_hidden_layers": 34, "sliding_window": 1024,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}})
    t = cfg.text
    from gemma3_mlx.model import Model

    caches = Model(cfg).make_cache()
    n = 8192
    for c in caches:  # feed keys straight into the caches: the model itself is not needed
        for start in range(0, n, 2048):
            kv = mx.zeros((1, t.num_key_value_heads, 2048, t.head_dim), mx.bfloat16)
            c.update_and_fetch(kv, kv)
        mx.eval(c.state)
    held = sum(c.nbytes for c in caches)
    assert abs(held - kv_bytes(cfg, n)) / kv_bytes(cfg, n) < 0.01
    assert kv_bytes(cfg, n, full=True) / kv_bytes(cfg, n) > 3.9  # 5 of 6 layers stay at the window


def test_quantized_global_kv_close_to_float(tiny):
    model = tiny["tiny_v5"]
    W = model.config.text.sliding_window
    ids = random_ids(model, 6 * W, seed=3)
    ref = run_chunks(model, ids, W)
    for bits, max_kl in ((8, 1e-3), (4, 5e-2)):
        cache = model.make_cache(kv_bits=bits, kv_group_size=32)
        assert sum(isinstance(c, QuantizedKVCache) for c in cache) == 2
        out = run_chunks(model, ids, W, cache)
        logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        logq = out - np.log(np.exp(out).sum(-1, keepdims=True))
        kl = (np.exp(logp) * (logp - logq)).sum(-1).mean()
        assert 0 < kl <= max_kl, (bits, kl)
        # Token by token through the quantized cache agrees with chunks of W.
        step = run_chunks(model, ids, 1, model.make_cache(kv_bits=bits, kv_group_size=32))
        assert np.abs(step - out).max() < 1e-4


def test_conversation_with_regenerated_turn_equals_processing_from_scratch(tiny):
    model = tiny["tiny_v5"]
    W = model.config.text.sliding_window
    rng = np.random.default_rng(7)
    turns = [rng.integers(4, 300, n).tolist() for n in (W + 2, 5, W + 3, 4, W)]  # user, reply, user, reply, user
    pc = PromptCache(model)
    conversation = [2]
    for i, turn in enumerate(turns):
        conversation += turn
        if i % 2 == 0:
            pc.prefill(conversation)  # each turn runs only its new tokens (and the reply before it)
            assert pc.reprocessed == len(turn) + (len(turns[i - 1]) if i else 1)
            pc.snapshot()
    assert len(conversation) > 2 * W
    # Regenerate the last reply after the ring has wrapped: roll back to the last user turn's end.
    before_reply = conversation[: len(conversation) - len(turns[-1])] + turns[-1][:2]
    logits = np.array(pc.prefill(before_reply))
    scratch = np.array(PromptCache(model).prefill(before_reply))
    assert np.abs(logits - scratch).max() <= 1e-5
    assert pc.reprocessed < len(before_reply) // 2  # restored from a snapshot, not from zero
    # ... and a different last user message (an edit) too.
    edited = conversation[: len(conversation) - len(turns[-1])] + [7, 8, 9]
    assert np.abs(np.array(pc.prefill(edited)) - np.array(PromptCache(model).prefill(edited))).max() <= 1e-5


def test_prompt_cache_save_load_continues_identically(tiny, tmp_path):
    from gemma3_mlx.generate import generate_tokens

    model = tiny["tiny_v5"]
    ids = random_ids(model, 25, seed=11)
    pc = PromptCache(model)
    pc.prefill(ids)
    pc.save(tmp_path / "p.safetensors")
    fresh = list(generate_tokens(model, ids + [5, 6], max_tokens=12))
    loaded = PromptCache.load(tmp_path / "p.safetensors", model)
    assert loaded.tokens == ids
    resumed = list(generate_tokens(model, ids + [5, 6], cache=loaded, max_tokens=12))
    assert resumed == fresh and loaded.reprocessed == 2
    with pytest.raises(PromptCacheError, match="different model"):
        PromptCache.load(tmp_path / "p.safetensors", tiny["tiny_v4"])
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(PromptCacheError):
        PromptCache.load(tmp_path / "bad.safetensors", model)


def test_prompt_cache_with_quantized_kv_round_trips(tiny, tmp_path):
    model = tiny["tiny_v5"]
    ids = random_ids(model, 30, seed=5)
    pc = PromptCache(model, kv_bits=4, kv_group_size=32)
    a = np.array(pc.prefill(ids))
    pc.save(tmp_path / "q.safetensors")
    loaded = PromptCache.load(tmp_path / "q.safetensors", model)
    b = np.array(loaded.prefill(ids + [9]))
    c = np.array(PromptCache(model, kv_bits=4, kv_group_size=32).prefill(ids + [9]))
    assert np.abs(b - c).max() <= 1e-5 and loaded.reprocessed == 1 and a.shape == b.shape
