"""The generation engine: batched = alone (token for token), rows joining and leaving, cancellation,
logprobs, seeded sampling, and a decode loop that queues step n+1 before reading step n."""

import json

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx

from conftest import FIXTURES
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.engine import Engine
from gemma3_mlx.generate import generate_tokens
from gemma3_mlx.loader import load_model
from gemma3_mlx.model import Model
from gemma3_mlx.prompt_cache import PromptCache
from gemma3_mlx.settings import make_sampler


def tiny_model(window: int, seed: int = 0, layers: int = 6, vocab: int = 512) -> Model:
    """A random Gemma 3 small enough for logic tests: 5 local layers per global one."""
    cfg = ModelConfig.from_dict({
        "model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "query_pre_attn_scalar": 32, "sliding_window": window, "max_position_embeddings": 4096,
    })
    mx.random.seed(seed)
    model = Model(cfg)
    mx.eval(model.parameters())
    return model


def prompts_for(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    V = model.config.text.vocab_size
    return [[2] + rng.integers(4, V, n - 1).tolist() for n in lengths]


def run(engine, uids):
    got = {u: [] for u in uids}
    finishes = {}
    while engine.has_work:
        for e in engine.step():
            if e.token is not None:
                got[e.uid].append(e.token)
            if e.finish_reason:
                finishes[e.uid] = e.finish_reason
    return got, finishes


def alone(model, prompt, n, **kw):
    return list(generate_tokens(model, prompt, max_tokens=n, stop_ids=(), **kw))


@pytest.fixture(scope="module")
def models():
    return {w: tiny_model(w, seed=w) for w in (5, 6, 7, 8)}


@pytest.mark.parametrize("window", [5, 6, 7, 8])
def test_batched_greedy_equals_alone_rows_joining_and_leaving(models, window):
    """8 rows of 1 to 5 windows of prompt, 4 at a time: rows join as others leave, each at its own
    position, all past the window; every row's tokens equal its tokens alone."""
    model = models[window]
    lengths = [1, window - 1, window, window + 1, 2 * window + 3, 3 * window, 4 * window + 1, 5 * window]
    prompts = prompts_for(model, lengths, seed=window)
    n_new = [3 * window + i for i in range(len(prompts))]
    want = [alone(model, p, n) for p, n in zip(prompts, n_new)]
    engine = Engine(model, max_batch=4, prefill_chunk=window + 2)
    uids = [engine.submit(p, max_tokens=n, stop_ids=()) for p, n in zip(prompts, n_new)]
    got, finishes = run(engine, uids)
    assert [got[u] for u in uids] == want
    assert set(finishes.values()) == {"length"}
    assert engine.layers is None and not engine.rows  # everyone left


def test_alone_equals_full_recompute(models):
    """The engine's cached decoding equals recomputing the whole sequence every step (no cache)."""
    model = models[5]
    prompt = prompts_for(model, [9])[0]
    ids, want = list(prompt), []
    for _ in range(16):
        t = int(mx.argmax(model(mx.array(ids)[None])[0, -1]).item())
        want.append(t)
        ids.append(t)
    assert alone(model, prompt, 16) == want


def test_quantized_global_kv_batched_equals_alone(models):
    model = models[6]
    prompts = prompts_for(model, [3, 11, 25, 40], seed=1)
    kw = {"kv_bits": 8, "kv_group_size": 32}
    want = []
    for p in prompts:
        e = Engine(model, max_batch=1, **kw)
        got, _ = run(e, [e.submit(p, max_tokens=20, stop_ids=())])
        want.append(next(iter(got.values())))
    engine = Engine(model, max_batch=4, **kw)
    uids = [engine.submit(p, max_tokens=20, stop_ids=()) for p in prompts]
    got, _ = run(engine, uids)
    assert [got[u] for u in uids] == want


def test_seeded_sampling_and_repetition_penalty_batched_equal_alone(models):
    model = models[7]
    prompts = prompts_for(model, [4, 9, 30], seed=2)

    def sampler(i):
        return make_sampler(temp=0.9, top_k=40, repetition_penalty=1.3, seed=100 + i)

    want = [alone(model, p, 24, sampler=sampler(i)) for i, p in enumerate(prompts)]
    engine = Engine(model, max_batch=3)
    uids = [engine.submit(p, max_tokens=24, stop_ids=(), sampler=sampler(i)) for i, p in enumerate(prompts)]
    got, _ = run(engine, uids)
    assert [got[u] for u in uids] == want
    assert len({tuple(w) for w in want}) == 3


def test_stop_token_ends_a_row_and_its_cache_holds_exactly_prompt_and_reply(models):
    model = models[6]
    prompt = prompts_for(model, [13], seed=3)[0]
    free = alone(model, prompt, 12)
    stop = free[5]  # pretend the 6th token is a stop token
    first = free.index(stop)
    other = prompts_for(model, [20], seed=4)[0]
    engine = Engine(model, max_batch=2)
    pc = PromptCache(model)
    a = engine.submit(prompt, max_tokens=12, stop_ids=(stop,), cache=pc)
    b = engine.submit(other, max_tokens=12, stop_ids=())
    got, finishes = run(engine, [a, b])
    assert got[a] == free[: first + 1] and finishes[a] == "stop"
    assert got[b] == alone(model, other, 12)
    # The token queued after the stop was taken back: the cache holds prompt + reply, no stop token.
    assert pc.tokens == prompt + free[:first]
    assert all(c.offset == len(pc.tokens) for c in pc.layers)
    # ... and continuing from it equals running the whole thing from scratch.
    cont = alone(model, pc.tokens + [7], 6, cache=pc)
    assert cont == alone(model, prompt + free[:first] + [7], 6)


def test_cancel_leaves_a_consistent_cache(models):
    model = models[8]
    prompts = prompts_for(model, [10, 17], seed=5)
    engine = Engine(model, max_batch=2)
    pcs = [PromptCache(model), PromptCache(model)]
    uids = [engine.submit(p, max_tokens=30, stop_ids=(), cache=c) for p, c in zip(prompts, pcs)]
    seen = {u: [] for u in uids}
    cancelled = []
    while engine.has_work:
        for e in engine.step():
            if e.token is not None:
                seen[e.uid].append(e.token)
            if e.finish_reason == "cancelled":
                cancelled.append(e.uid)
        if len(seen[uids[0]]) == 4 and uids[0] not in cancelled:
            engine.cancel(uids[0])
    assert cancelled == [uids[0]] and len(seen[uids[0]]) == 4 and len(seen[uids[1]]) == 30
    pc = pcs[0]
    assert pc.tokens == prompts[0] + seen[uids[0]] and all(c.offset == len(pc.tokens) for c in pc.layers)
    full = pc.tokens + [9]
    assert alone(model, full, 5, cache=pc) == alone(model, full, 5)


def test_logprobs_are_the_models_log_softmax(models):
    model = models[5]
    prompt = prompts_for(model, [12], seed=6)[0]
    engine = Engine(model, max_batch=2)
    u = engine.submit(prompt, max_tokens=5, stop_ids=(), logprobs=3)
    other = prompts_for(model, [4], seed=7)[0]
    v = engine.submit(other, max_tokens=5, stop_ids=())  # a row that did not ask
    events, theirs = [], []
    while engine.has_work:
        for e in engine.step():
            (events if e.uid == u else theirs).append(e)
    ids = list(prompt)
    for e in events:
        logits = np.array(model(mx.array(ids)[None])[0, -1], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert abs(e.logprob - logp[e.token]) < 1e-4
        top = np.argsort(-logp)[:3]
        assert [t for t, _ in e.top_logprobs] == top.tolist()
        assert np.allclose([lp for _, lp in e.top_logprobs], logp[top], atol=1e-4)
        ids.append(e.token)
    # The row that did not ask gets no log-probabilities, and its tokens are its tokens alone.
    assert {e.uid for e in theirs} == {v} and all(e.logprob is None and e.top_logprobs == () for e in theirs)
    assert [e.token for e in theirs if e.token is not None] == alone(model, other, 5)


def test_decode_step_is_queued_before_its_token_is_read(models, monkeypatch):
    """Step n+1 is built from step n's lazy token before step n's value is read, and a decode step
    makes no other trip to the host: no mx.eval, no numpy conversion, exactly one read."""
    model = models[6]
    engine = Engine(model, max_batch=2)
    for p in prompts_for(model, [5, 9], seed=8):
        engine.submit(p, max_tokens=40, stop_ids=())
    while len(engine.rows) < 2:
        engine.step()  # prefill and join (one sync per sequence, for its time to first token)
    log = []
    syncs = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **k: (syncs.append("eval"), real_eval(*a, **k))[1])
    monkeypatch.setattr(np, "array", lambda *a, **k: syncs.append("np.array"))
    monkeypatch.setattr(np, "asarray", lambda *a, **k: syncs.append("np.asarray"))
    for _ in range(10):
        engine.pending = Pending(engine.pending, log)
        log.clear()
        events = engine.step()
        assert log == ["queued", "read"], log
        assert len(events) == 2 and not syncs
    monkeypatch.undo()


class Pending:
    """Stands in for the engine's pending tokens and records in `log` how they are used."""

    def __init__(self, a, log):
        self.a, self.log = a, log

    def __getitem__(self, idx):
        self.log.append("queued")
        return self.a[idx]

    def tolist(self):
        self.log.append("read")
        return self.a.tolist()

    def __getattr__(self, name):  # item, __array__, astype, ...: any other use is a host trip
        self.log.append(f"other:{name}")
        return getattr(self.a, name)


def image_prompt():
    """The tiny vision fixture with its one-image prompt: (model, ids, images, reference arrays)."""
    vlm = FIXTURES / "tiny_vlm"
    model = load_model(vlm, dtype="float32")
    ref = {k: np.array(v) for k, v in mx.load(str(vlm / "ref.safetensors")).items()}
    spec = json.loads((vlm / "prompts.json").read_text())["prompts"]["one_image"]
    return model, ref["one_image.input_ids"][0].tolist(), list(ref["pixels_nhwc"][spec["images"]]), ref


def test_an_image_row_batches_with_text_rows():
    model, ids, images, ref = image_prompt()
    text = prompts_for(model, [7, 30], seed=9)
    want = [alone(model, ids, 10, images=images)] + [alone(model, p, 10) for p in text]
    # The image row's first token is the reference's greedy choice.
    assert want[0][0] == int(np.argmax(ref["one_image.logits"][0, -1]))
    engine = Engine(model, max_batch=3, prefill_chunk=8)
    uids = [engine.submit(ids, max_tokens=10, stop_ids=(), images=images)]
    uids += [engine.submit(p, max_tokens=10, stop_ids=()) for p in text]
    got, _ = run(engine, uids)
    assert [got[u] for u in uids] == want


def test_interrupted_step_leaves_every_cache_consistent(models, monkeypatch):
    model = models[7]
    prompts = prompts_for(model, [6, 15], seed=10)
    pcs = [PromptCache(model), PromptCache(model)]
    engine = Engine(model, max_batch=2)
    uids = [engine.submit(p, max_tokens=20, stop_ids=(), cache=c) for p, c in zip(prompts, pcs)]
    seen = {u: [] for u in uids}
    for _ in range(4):
        for e in engine.step():
            seen[e.uid].append(e.token)
    real = type(model.model.layers[3]).__call__
    calls = {"n": 0}

    def flaky(self, *a, **k):  # Ctrl-C halfway through the layers of a decode step
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(type(model.model.layers[3]), "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    monkeypatch.undo()
    engine.close()
    for u, p, pc in zip(uids, prompts, pcs):
        assert pc.tokens == p + seen[u]
        assert all(c.offset == len(pc.tokens) for c in pc.layers)
        full = pc.tokens + [5]
        assert alone(model, full, 4, cache=pc) == alone(model, full, 4)


@pytest.mark.slow
def test_270m_four_rows_batched_equal_alone(model_270m):
    model, tok = model_270m
    texts = ["The capital of France is", "Once upon a time, in a small village,",
             "def fibonacci(n):", "The three primary colours are"]
    want = [gemma3_mlx.generate(model, tok, t, max_tokens=12) for t in texts]
    got = gemma3_mlx.batch_generate(model, tok, texts, max_tokens=12, max_batch=4)
    assert [c.text for c in got] == want
    assert all(c.stats.generation_tokens >= 1 and c.finish_reason in ("stop", "length") for c in got)


def test_holding_says_what_the_engine_holds():
    """Engine.holding(): uids and counts follow the sequences through waiting, decoding and the end; the
    keys and values held grow with the tokens and are all handed back once every sequence has ended."""
    engine = Engine(tiny_model(16, seed=3), max_batch=2)
    caches = [PromptCache(engine.model) for _ in range(3)]
    uids = [engine.submit([1, 5, 9, 11 + i], max_tokens=4, cache=c) for i, c in enumerate(caches)]
    h = engine.holding()
    assert (h.uids, h.waiting, h.active, h.kv_bytes) == (frozenset(uids), 3, 0, 0)
    engine.step()
    h = engine.holding()
    assert h.uids == frozenset(uids) and (h.waiting, h.active) == (1, 2) and h.kv_bytes > 0
    seen = [h.kv_bytes]
    while engine.holding().uids:
        engine.step()
        seen.append(engine.holding().kv_bytes)
    assert engine.holding() == (frozenset(), 0, 0, 0)
    assert max(seen) >= sum(c.nbytes for c in caches[:2]) > 0  # the two rows that decoded together
