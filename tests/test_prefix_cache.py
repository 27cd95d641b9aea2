"""The server's prefix cache shared across conversations (cache_pool.py): a new conversation that
shares a system prompt with a cached one prefills only the rest, past the sliding window, and
nothing it does changes the other conversation's cache. Every reply is compared with a cold
server's (a pool of 0 bytes: every prompt prefilled from scratch), token for token (greedy).

The Worker (the server's model thread) is driven directly with Jobs, as the HTTP side does."""

import queue
import threading

import mlx.core as mx
import pytest

import gemma3_mlx
from gemma3_mlx.cache_pool import CachePool
from gemma3_mlx.cli.serve_worker import Job, Worker
from gemma3_mlx.prompt_cache import PromptCache
from test_server import make_tiny

SYSTEM = ("You are the assistant of a small public library. Answer briefly and kindly; name the shelf "
          "where a book stands when you know it. ")


@pytest.fixture(scope="module")
def tiny(tokenizer_270m, tmp_path_factory):
    """A tiny random model with the real 270M tokenizer and a 32-token window."""
    return gemma3_mlx.load(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("pc") / "tiny"))


class Served:
    """A Worker started on a model (no HTTP): `ask` submits jobs at once and waits for all of them."""

    def __init__(self, model, tokenizer, cache_bytes: int):
        self.worker = Worker(model, tokenizer, max_batch=8, cache_bytes=cache_bytes, max_queue=16)
        self.worker.start()

    def ask(self, conversations: list[list[dict]], max_tokens: int = 6) -> list[tuple[str, dict]]:
        boxes = [queue.SimpleQueue() for _ in conversations]
        for msgs, box in zip(conversations, boxes):  # chat messages, or a raw prompt (str)
            kind = "prompt" if isinstance(msgs, str) else "messages"
            assert self.worker.submit(Job(box.put, max_tokens=max_tokens, **{kind: msgs}))
        out = []
        for box in boxes:
            text = []
            while True:
                item = box.get(timeout=600)
                if item[0] == "delta":
                    text.append(item[1])
                elif item[0] == "done":
                    out.append(("".join(text), item[2]))
                    break
                elif item[0] == "error":
                    raise AssertionError(item)
        return out

    def close(self):
        self.worker.stop()


def chat(system: str, *turns: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def cold(model, tokenizer, conversations, max_tokens=6) -> list[str]:
    s = Served(model, tokenizer, cache_bytes=0)  # nothing kept: every prompt prefilled from scratch
    try:
        return [s.ask([c], max_tokens)[0][0] for c in conversations]
    finally:
        s.close()


# ---------------------------------------------------------------------- the library


def test_a_fork_continues_exactly_and_leaves_its_source_untouched(tiny):
    model, tok = tiny
    system = SYSTEM * 6
    a_ids = tok.apply_chat_template(chat(system, "Where are the atlases?"))
    b_ids = tok.apply_chat_template(chat(system, "Do you lend music scores, and for how long?"))
    mark = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
    assert mark > 3 * model.config.text.sliding_window  # the branch lies far past the window
    a = PromptCache(model)
    a.marks = frozenset([mark])
    a_logits = a.prefill(a_ids, chunk=40)
    a.snapshot(a_logits)
    before = {i: {k: mx.array(v) for k, v in c.state.items()} for i, c in enumerate(a.layers)}

    b = a.fork(mark)  # from the branch point's snapshot (the rings have moved on since)
    assert b.tokens == a_ids[:mark] and mark in b.branches
    b_logits = b.prefill(b_ids)
    assert b.reprocessed == len(b_ids) - mark
    b_cold = PromptCache(model).prefill(b_ids)
    assert mx.allclose(b_logits, b_cold, atol=1e-5, rtol=1e-5)
    for _ in range(3):  # b decodes on: its writes never reach a
        b.feed([int(mx.argmax(b_logits))])
    for i, c in enumerate(a.layers):
        for k, v in c.state.items():
            assert mx.array_equal(v, before[i][k]), (i, k)
    a_cold = PromptCache(model)
    a_cold.prefill(a_ids)
    assert mx.allclose(a.feed([5, 6]), a_cold.feed([5, 6]), atol=1e-5, rtol=1e-5)  # a goes on as if alone


def test_the_pool_forks_a_shared_prefix_and_lends_a_continuation(tiny):
    model, tok = tiny
    system = SYSTEM * 6
    pool = CachePool(model, 1 << 30)
    a_ids = tok.apply_chat_template(chat(system, "Where are the atlases?"))
    a = pool.take(a_ids)
    a.marks = frozenset([len(tok.apply_chat_template(chat(system, ""))) - 5])  # somewhere in the system text
    a.prefill(a_ids)
    a.snapshot()
    pool.give(a)
    other = tok.apply_chat_template(chat(system, "Opening hours?"))
    b = pool.take(other)
    assert b is not a and pool.forks == 1 and len(pool) == 1 and min(a.marks) in b.snapshots
    assert pool.take(a_ids + [107]) is a and pool.hits == 1  # its continuation takes it whole
    assert pool.take(tok.apply_chat_template(chat("Something else.", "Hi"))) is not b and pool.misses == 2


# ---------------------------------------------------------------------- the server


def test_six_conversations_share_a_system_prompt_past_the_window(tiny):
    model, tok = tiny
    system = SYSTEM * 8
    questions = ["Where are the atlases?", "Can I renew a loan online?", "Do you have large-print novels?",
                 "Is there a quiet room for study?", "How many books may a child borrow?",
                 "Do you lend music scores?"]
    convs = [chat(system, q) for q in questions]
    s = Served(model, tok, cache_bytes=1 << 30)
    try:
        warm = [s.ask([c])[0] for c in convs]  # one after another: each finds the others in the pool
    finally:
        s.close()
    prompt = warm[1][1]["prompt_tokens"]
    assert prompt > 4 * model.config.text.sliding_window
    for text, usage in warm[1:]:
        assert usage["cached_tokens"] >= 0.9 * usage["prompt_tokens"], usage
    assert warm[0][1]["cached_tokens"] == 0
    assert [t for t, _ in warm] == cold(model, tok, convs)


def test_two_conversations_sharing_a_prefix_continued_alternately_equal_their_cold_replies(tiny):
    model, tok = tiny
    system = SYSTEM * 5
    s = Served(model, tok, cache_bytes=1 << 30)
    convs = {"a": chat(system, "Where are the atlases?"), "b": chat(system, "And the maps of the city?")}
    follow = {"a": ["And the globes?", "Thank you. Opening hours?"], "b": ["Older maps too?", "Can I copy them?"]}
    replies = {"a": [], "b": []}
    try:
        for turn in range(3):
            for name in ("a", "b"):
                text, usage = s.ask([convs[name]])[0]
                replies[name].append(text)
                if turn or name == "b":
                    assert usage["cached_tokens"] >= 0.8 * usage["prompt_tokens"], (name, turn, usage)
                if turn < 2:
                    convs[name] = convs[name] + [{"role": "assistant", "content": text},
                                                 {"role": "user", "content": follow[name][turn]}]
    finally:
        s.close()
    for name in ("a", "b"):  # each turn again, cold: the same prompt (the replies as they came back)
        msgs = convs[name]
        prefixes = [msgs[: 2 + 2 * t] for t in range(3)]
        assert replies[name] == cold(model, tok, prefixes), name


def test_eviction_under_a_small_pool_never_breaks_a_conversation_in_flight(tiny):
    model, tok = tiny
    system = SYSTEM * 6
    convs = [chat(system, f"Question {i}: " + "tell me more " * i) for i in range(8)]
    small = 0
    probe = Served(model, tok, cache_bytes=1 << 30)
    try:
        probe.ask([convs[0]])
        small = int(1.5 * probe.worker.pool.bytes)  # room for about one conversation
    finally:
        probe.close()
    s = Served(model, tok, cache_bytes=small)
    got = []
    try:
        s.ask([convs[0]])  # a source to fork from, soon evicted while forks of it run
        threads = [threading.Thread(target=lambda c=c: got.append((c, s.ask([c], 12)[0][0]))) for c in convs[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.worker.pool.evictions >= 3 and s.worker.pool.bytes <= small
    finally:
        s.close()
    by_conv = {id(c): t for c, t in got}
    assert [by_conv[id(c)] for c in convs[1:]] == cold(model, tok, convs[1:], 12)


def test_real_270m_six_conversations_with_a_700_token_system_prompt(default_model):
    """The acceptance on the default model: a 700-token system prompt (past its 512-token window)."""
    model, tok = default_model
    system = ("You answer questions for the visitors of a natural history museum. " * 60).strip()
    questions = ["Where are the dinosaurs?", "Is there a cafe?", "When does the museum close?",
                 "Can I take photos?", "Are dogs allowed?", "Where is the shop?"]
    convs = [chat(system, q) for q in questions]
    s = Served(model, tok, cache_bytes=2 << 30)
    try:
        warm = [s.ask([c], 8)[0] for c in convs]
    finally:
        s.close()
    assert warm[0][1]["prompt_tokens"] > 700
    for _, usage in warm[1:]:
        assert usage["cached_tokens"] >= 0.9 * usage["prompt_tokens"], usage
    assert [t for t, _ in warm] == cold(model, tok, convs, 8)


def test_raw_prompts_sharing_a_preamble_find_their_branch_point(tiny):
    """No chat roles to mark: the second prompt that leaves the first at the same place makes that
    place a branch point (a snapshot in its own cache), and from the third on the preamble is shared."""
    model, tok = tiny
    preamble = "Notes from the reading room. " + SYSTEM * 6
    prompts = [preamble + f"Entry {i}: " + "a visitor asked about " * (i + 1) for i in range(4)]
    s = Served(model, tok, cache_bytes=1 << 30)
    try:
        warm = [s.ask([p])[0] for p in prompts]
    finally:
        s.close()
    assert warm[1][1]["cached_tokens"] < 0.5 * warm[1][1]["prompt_tokens"]  # no snapshot there yet
    for _, usage in warm[2:]:
        assert usage["cached_tokens"] >= 0.8 * usage["prompt_tokens"], usage
    assert [t for t, _ in warm] == cold(model, tok, prompts)
