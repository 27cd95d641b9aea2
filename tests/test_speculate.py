"""Speculative decoding: greedy output equals plain greedy decoding token for token (any proposer,
any k, past many windows, quantized KV, an image in the prompt); sampled output follows the
target's distribution (chi-square); rounds take back rejected guesses exactly."""

import numpy as np
import pytest

import gemma3_mlx
import mlx.core as mx

from gemma3_mlx.convert.quality import TEXT
from gemma3_mlx.engine import Engine
from gemma3_mlx.prompt_cache import PromptCache
from gemma3_mlx.settings import make_sampler
from gemma3_mlx.speculate import DraftModel, PromptLookup, Speculation, accept_sampled
from test_engine import alone, image_prompt, prompts_for, tiny_model


@pytest.fixture(scope="module")
def pairs():
    return {w: (tiny_model(w, seed=w + 1), tiny_model(w, seed=w + 2)) for w in (8, 16)}


PLAIN = {}  # (model, prompt, n) -> plain greedy tokens: the three proposers of a (window, k) share a prompt


def plain_greedy(model, prompt, n):
    """`alone(model, prompt, n)`, the reference, computed once per model, prompt and length."""
    key = (id(model), tuple(prompt), n)
    if key not in PLAIN:
        PLAIN[key] = alone(model, prompt, n)
    return list(PLAIN[key])


def speculate(model, prompt, n, draft, k, always=True, monkeypatch=None, **engine_kw):
    """Tokens and final stats of one speculative generation (the switch-off disabled with always=True)."""
    if always:
        monkeypatch.setattr(Speculation, "paying", lambda self: True)
    engine = Engine(model, max_batch=1, **engine_kw)
    pc = PromptCache(model, **engine.cache_args)
    engine.submit(prompt, max_tokens=n, stop_ids=(), draft=draft, draft_tokens=k, cache=pc)
    got, last = [], None
    while engine.has_work:
        for e in engine.step():
            got.append(e.token)
            last = e
    return got, last.stats, pc


LONG_RUN = (3, "other", 16)  # (k, proposer, window): one run of 2,000 tokens past 125 windows, the rest 300


@pytest.mark.parametrize("k,proposer,window", [
    pytest.param(*case, marks=[pytest.mark.slow] if case == LONG_RUN else [])  # the long run: ~35 s of CPU
    for case in ((k, proposer, window) for k in (1, 3, 8) for proposer in ("self", "other", "lookup") for window in (8, 16))])
def test_greedy_speculation_equals_plain_greedy(pairs, window, proposer, k, monkeypatch):
    target, other = pairs[window]
    prompt = prompts_for(target, [2 * window + 3], seed=window + k)[0]
    n = 2000 if (k, proposer, window) == LONG_RUN else 300
    want = plain_greedy(target, prompt, n)
    draft = {"self": lambda: DraftModel(target), "other": lambda: DraftModel(other), "lookup": PromptLookup}[proposer]()
    got, stats, pc = speculate(target, prompt, n, draft, k, monkeypatch=monkeypatch)
    assert got == want
    assert stats.target_steps > 0 and stats.draft_tokens > 0
    if proposer == "self":
        assert stats.acceptance == 1.0 and stats.tokens_per_step > 1.5
    # The cache holds prompt + reply (the last token may not have run), each layer exactly that far.
    assert pc.tokens in (prompt + got, prompt + got[:-1]) and all(c.offset == len(pc.tokens) for c in pc.layers)


def test_greedy_speculation_with_quantized_global_kv(pairs, monkeypatch):
    target, other = pairs[8]
    prompt = prompts_for(target, [30], seed=1)[0]
    e = Engine(target, max_batch=1, kv_bits=8, kv_group_size=32)
    e.submit(prompt, max_tokens=400, stop_ids=())
    want = [ev.token for _ in iter(lambda: e.has_work, False) for ev in e.step()]
    got, stats, _ = speculate(target, prompt, 400, DraftModel(other), 4, monkeypatch=monkeypatch,
                              kv_bits=8, kv_group_size=32)
    assert got == want


def test_greedy_speculation_with_an_image_in_the_prompt(monkeypatch):
    model, ids, images, _ = image_prompt()
    want = alone(model, ids, 60, images=images)
    monkeypatch.setattr(Speculation, "paying", lambda self: True)
    for draft in (PromptLookup(), DraftModel(model)):  # a draft reads the image block as padding
        engine = Engine(model, max_batch=1)
        engine.submit(ids, max_tokens=60, stop_ids=(), images=images, draft=draft, draft_tokens=3)
        got = [ev.token for _ in iter(lambda: engine.has_work, False) for ev in engine.step()]
        assert got == want


def test_speculation_that_does_not_pay_switches_itself_off(pairs):
    target, other = pairs[16]
    prompt = prompts_for(target, [20], seed=2)[0]
    want = alone(target, prompt, 120)
    engine = Engine(target, max_batch=1)
    engine.submit(prompt, max_tokens=120, stop_ids=(), draft=DraftModel(other), draft_tokens=4)
    got, switched = [], False
    while engine.has_work:
        got += [e.token for e in engine.step()]
        switched |= bool(engine.rows)  # the row moved to the plain (batched, pipelined) decode
    assert got == want and switched


def test_stop_token_mid_round_leaves_prompt_and_reply_in_the_cache(pairs, monkeypatch):
    target, _ = pairs[8]
    prompt = prompts_for(target, [19], seed=3)[0]
    free = alone(target, prompt, 40)
    stop = free[17]
    first = free.index(stop)
    monkeypatch.setattr(Speculation, "paying", lambda self: True)
    engine = Engine(target, max_batch=1)
    pc = PromptCache(target)
    engine.submit(prompt, max_tokens=40, stop_ids=(stop,), draft=DraftModel(target), draft_tokens=6, cache=pc)
    got = [ev.token for _ in iter(lambda: engine.has_work, False) for ev in engine.step()]
    assert got == free[: first + 1]
    assert pc.tokens == prompt + free[:first] and all(c.offset == len(pc.tokens) for c in pc.layers)


def test_seeded_sampled_speculation_is_reproducible(pairs, monkeypatch):
    target, other = pairs[8]
    prompt = prompts_for(target, [12], seed=4)[0]
    runs = []
    for _ in range(2):
        monkeypatch.setattr(Speculation, "paying", lambda self: True)
        engine = Engine(target, max_batch=1)
        engine.submit(prompt, max_tokens=50, stop_ids=(), draft=DraftModel(other), draft_tokens=3,
                      sampler=make_sampler(temp=0.8, top_k=50, repetition_penalty=1.1, seed=9))
        runs.append([ev.token for _ in iter(lambda: engine.has_work, False) for ev in engine.step()])
    assert runs[0] == runs[1] and len(set(runs[0])) > 5


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_accepted_tokens_follow_the_target_distribution(proposer):
    """Chi-square: the first token out of a round is distributed as the target's p, for a proposer that
    disagrees often (draft: q far from p; lookup: a certain guess of an unlikely token)."""
    V, k, n = 6, 2, 20_000
    p = mx.array([[0.35, 0.25, 0.15, 0.12, 0.08, 0.05]] * (k + 1))
    q_row = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    q = mx.array(np.tile(q_row, (k, 1)), dtype=mx.float32) if proposer == "draft" else None
    rng = np.random.default_rng(0)
    key = mx.random.key(1)
    counts = np.zeros(V)
    for _ in range(n):
        drafts = rng.choice(V, size=k, p=q_row).tolist() if proposer == "draft" else [4, 5]
        key, sub = mx.random.split(key)
        counts[accept_sampled(p, q, drafts, sub)[0]] += 1
    expected = n * np.array(p[0])
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # p > 0.001 at 5 degrees of freedom


@pytest.mark.slow
def test_270m_speculation_equals_plain_greedy(model_270m, default_model):
    """A 700-token prompt (past the 512-token window) and 80 greedy tokens on the real 270M (float32):
    prompt lookup, and the 4-bit 270M (the default model's Q4_K_M weights) drafting for the float one:
    identical text."""
    model, tok = model_270m
    draft_model, _ = default_model

    prompt = tok.encode("Repeat the following text exactly.\n\n" + (TEXT + "\n\n") * 3)[:700]
    assert len(prompt) == 700
    want = gemma3_mlx.generate(model, tok, prompt, max_tokens=80)
    for kw in ({"prompt_lookup": True}, {"draft_model": draft_model}):
        pieces = list(gemma3_mlx.stream_generate(model, tok, prompt, max_tokens=80, **kw))
        assert "".join(p.text for p in pieces) == want
        assert pieces[-1].stats.target_steps > 0


@pytest.mark.slow
def test_cli_prompt_lookup_same_text_and_acceptance_in_stats(default_model_dir, gemma3_home):
    from conftest import gemma3

    prompt = "Alice said: the quick brown fox jumps over the lazy dog. Bob repeated: the quick brown fox"
    runs = [gemma3(["generate", "-m", default_model_dir, "--raw", prompt, "-n", "24", "--stats", *extra],
                   home=gemma3_home) for extra in ([], ["--prompt-lookup"])]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and "jumps over the lazy dog" in runs[1].stdout
    assert "accepted" not in runs[0].stderr and "% accepted" in runs[1].stderr and "tokens per target step" in runs[1].stderr
    # bench repeats its built-in text to fill the prompt: prompt lookup finds it.
    r = gemma3(["bench", "-m", default_model_dir, "--prompt-tokens", "600", "--gen-tokens", "12", "--repeats", "1",
                "--prompt-lookup"], home=gemma3_home)
    assert r.returncode == 0, r.stderr
    accepted = next(line for line in r.stdout.splitlines() if line.startswith("drafts accepted"))
    assert int(accepted.split()[2].rstrip("%")) > 50 and "tokens per step" in r.stdout


@pytest.mark.slow
def test_chat_with_a_draft_model_gives_the_same_replies(model_270m):
    """Greedy chat with the 270M drafting for itself: the same replies as plain chat, every guess kept,
    and the draft's own prompt cache carried from turn to turn (only the new tokens run for it)."""
    model, tok = model_270m
    plain = gemma3_mlx.ChatSession(model, tok, max_tokens=12)
    fast = gemma3_mlx.ChatSession(model, tok, max_tokens=12, draft_model=model)
    for question in ("What is the capital of France?", "And of Italy?"):
        want = "".join(p.text for p in plain.send(question))
        draft_before = len(fast.draft.cache.tokens)
        got = "".join(p.text for p in fast.send(question))
        assert got == want
        assert fast.last.stats.acceptance == 1.0 and fast.last.stats.tokens_per_step > 1.5
        if draft_before:
            assert fast.draft.cache.reprocessed < len(fast.cache.tokens) - draft_before + 8
