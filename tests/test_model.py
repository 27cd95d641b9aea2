"""The MLX model against transformers on tiny random configs (both config schemas), and cache consistency."""

import mlx.core as mx
import numpy as np
import pytest

from gemma3_mlx import forward
from gemma3_mlx.cache import ROLLBACK, KVCache, WindowCache
from gemma3_mlx.prompt_cache import PromptCache
from gemma3_mlx.loader import load_model

from conftest import FIXTURES

NAMES = ["tiny_v5", "tiny_v4"]


def reference(name):
    fx = mx.load(str(FIXTURES / name / "logits.safetensors"))
    return fx["input_ids"], np.array(fx["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_full_forward_matches_transformers(tiny_dirs, name):
    model = load_model(tiny_dirs[name], dtype="float32")
    ids, ref = reference(name)
    out = np.array(model(ids))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4
    assert np.abs(ref).max() > 1.0  # the fixture is not degenerate


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_decoding_matches_full_forward(tiny_dirs, name):
    model = load_model(tiny_dirs[name], dtype="float32")
    ids, ref = reference(name)
    full = np.array(model(ids))
    cache = model.make_cache()
    steps = np.concatenate([np.array(model(ids[:, i : i + 1], cache)) for i in range(ids.shape[1])], axis=1)
    assert np.abs(steps - full).max() <= 1e-5
    assert np.abs(steps - ref).max() <= 1e-4
    assert all(c.offset == ids.shape[1] for c in cache)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_matches_full_forward_at_every_chunk_size(tiny_dirs, name):
    model = load_model(tiny_dirs[name], dtype="float32")
    ids, _ = reference(name)
    full = np.array(model(ids))
    W = model.config.text.sliding_window
    for chunk in (1, W - 1, W, W + 1, 3 * W):
        cache = model.make_cache()
        parts = [np.array(model(ids[:, s : s + chunk], cache)) for s in range(0, ids.shape[1], chunk)]
        assert np.abs(np.concatenate(parts, axis=1) - full).max() <= 1e-5, chunk
        # PromptCache.prefill computes the head for the last position only, and must agree.
        last = np.array(PromptCache(model).prefill(np.array(ids[0]).tolist(), chunk))
        assert np.abs(last - full[0, -1]).max() <= 1e-5, chunk


def test_output_head_only_where_the_caller_asks(tiny_dirs):
    """forward.logits runs the head on the last position, or on one position per row, and gives what the
    plain call gives there; forward.hidden runs no head at all (its states are the head's input)."""
    model = load_model(tiny_dirs["tiny_v5"], dtype="float32")
    ids, want = reference("tiny_v5")  # transformers' logits, (2, L, V)
    V = model.config.text.vocab_size
    last = np.array(forward.logits(model, ids, at="last"))
    assert last.shape == (2, 1, V) and np.abs(last[:, 0] - want[:, -1]).max() <= 1e-4
    at = mx.array([3, ids.shape[1] - 2])
    picked = np.array(forward.logits(model, ids, at=at))
    assert np.abs(picked[:, 0] - want[[0, 1], [3, ids.shape[1] - 2]]).max() <= 1e-4
    h = forward.hidden(model, ids, model.make_cache())
    assert h.shape == (*ids.shape, model.config.text.hidden_size)
    assert np.abs(np.array(model.head(h)) - want).max() <= 1e-4
    with pytest.raises(ValueError, match="at:"):
        forward.logits(model, ids, at="first")


def test_make_cache_kinds_and_nbytes(tiny_dirs):
    model = load_model(tiny_dirs["tiny_v5"], dtype="float32")
    t = model.config.text
    cache = model.make_cache()
    assert [isinstance(c, WindowCache) for c in cache] == list(t.is_local)
    assert [isinstance(c, KVCache) for c in cache] == [not x for x in t.is_local]
    ids, _ = reference("tiny_v5")
    model(ids[:1], cache)
    L, W, per_token = ids.shape[1], t.sliding_window, 2 * t.num_key_value_heads * t.head_dim * 4
    for c in cache:
        assert c.offset == L
        if isinstance(c, WindowCache):
            assert c.nbytes == (W - 1 + ROLLBACK) * per_token  # local layers hold only the window (+ rollback)
        else:
            assert L * per_token <= c.nbytes <= max(L, KVCache.step) * per_token


def test_bfloat16_compute_stays_close(tiny_dirs):
    model = load_model(tiny_dirs["tiny_v5"], dtype="bfloat16")
    ids, ref = reference("tiny_v5")
    out = model(ids)
    assert out.dtype == mx.bfloat16
    out = np.array(out.astype(mx.float32))
    assert np.isfinite(out).all()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_float16_compute_is_refused(tiny_dirs):
    with pytest.raises(ValueError, match="float16"):
        load_model(tiny_dirs["tiny_v5"], dtype=mx.float16)
