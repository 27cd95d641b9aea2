"""Speculative decoding: proposers and the acceptance rule. The engine (engine.py) runs the rounds.

A proposer guesses the next k tokens cheaply; the target model checks all of them in one forward
pass (about the cost of one token when decoding is bound by reading the weights), keeps the longest
prefix it agrees with plus one token of its own, and its caches take back the rest exactly
(cache.py). Two proposers: `DraftModel` (a smaller Gemma 3 sharing the tokenizer, with its own
prompt cache, kept across turns) and `PromptLookup` (the continuation of the longest recent n-gram
match in the context: summaries, code edits, quoting; no second model).

Greedy: a draft token is kept iff it is the target's argmax, so the output is plain greedy decoding,
token for token. Sampling: each draft token d is kept with probability min(1, p(d)/q(d)), a rejected
one is replaced by a draw from max(p - q, 0), and a fully accepted round adds a draw from p, so the
output follows the target's distribution p whatever the proposer (Leviathan et al., Chen et al., 2023).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from .constrain import masked
from .prompt_cache import PromptCache
from .sample import Sampler

PROBE_EVERY = 16  # every 16th round of a row is a plain step, timed: what speculating must beat
WARMUP_ROUNDS = 8  # rounds a row speculates before the policy may switch it off
MIN_ACCEPTANCE = 0.4  # below this share of guesses kept, speculation does not pay
DECAY = 0.7  # weight of the past in the recent averages of a round's costs


@dataclass
class Speculation:
    """One row's speculative decoding, state and policy: its proposer, how many guesses the next round
    makes (`k`, grown while every guess is kept, up to `k_cap`, the caches' rollback), what its rounds
    proposed and kept, their recent costs, and whether it still pays (`paying`)."""

    proposer: object  # DraftModel or PromptLookup
    k: int  # guesses the next round makes
    k_cap: int  # never more: the caches roll back at most this many tokens
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # target forward passes that checked guesses (probes included)
    propose_time: float = 0.0  # recent seconds proposing a round's guesses
    check_time: float = 0.0  # recent seconds of the target pass that checks them
    gained: float = 1.0  # recent tokens out per round
    plain_time: float = 0.0  # recent seconds of a plain one-token step (every PROBE_EVERY-th round)

    @property
    def probe(self) -> bool:
        """This round is a plain, timed step: the cost a round must beat."""
        return self.rounds % PROBE_EVERY == 0

    def record(self, n: int, kept: int, propose_time: float, check_time: float, probe: bool) -> None:
        """A round proposed `n` guesses and kept `kept` of them: the counters, the costs, the next k."""
        self.proposed, self.accepted, self.rounds = self.proposed + n, self.accepted + kept, self.rounds + 1
        if probe:
            self.plain_time = check_time if not self.plain_time else 0.5 * self.plain_time + 0.5 * check_time
        else:
            mix = lambda old, new: DECAY * old + (1 - DECAY) * new  # noqa: E731
            self.propose_time, self.check_time = mix(self.propose_time, propose_time), mix(self.check_time, check_time)
            self.gained = mix(self.gained, kept + 1)
        if n:  # grow k while everything is kept; otherwise just past what was kept
            self.k = min(self.k + 1, self.k_cap) if kept == n else max(1, kept + 1)

    def give_up_soon(self) -> None:
        """The proposer cannot go on (e.g. past a draft model's context): judge the row now."""
        self.rounds = max(self.rounds, WARMUP_ROUNDS)

    def paying(self) -> bool:
        """Speculation pays when the acceptance holds up and a round (proposing + checking) takes less
        time than the plain steps it replaces (tokens gained x a measured plain step)."""
        if self.accepted < MIN_ACCEPTANCE * self.proposed:
            return False
        return self.gained * self.plain_time > self.propose_time + self.check_time

    def switch_off(self) -> bool:
        """After the warm-up, a row whose speculation does not pay decodes plainly."""
        return self.rounds >= WARMUP_ROUNDS and not self.paying()


class PromptLookup:
    """Propose what followed the most recent earlier occurrence of the context's last n tokens
    (n from `max_ngram` down to `min_ngram`)."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int, sampler: Sampler | None = None):
        """(up to k proposed tokens, None: the proposal is certain, q is one-hot)."""
        n_tok = len(tokens)
        last = tokens[-1]
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            tail = tokens[n_tok - n :]
            for start in range(n_tok - n - 1, -1, -1):  # most recent first
                if tokens[start + n - 1] == last and tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def close(self) -> None:
        pass


class DraftModel:
    """A smaller Gemma 3 proposing tokens. Its `PromptCache` holds the conversation as the draft
    saw it, so each round (and each turn of a chat) processes only what is new to it."""

    def __init__(self, model, cache: PromptCache | None = None, rollback: int = 16):
        self.model = model
        self.cache = cache if cache is not None else PromptCache(model, rollback=rollback)

    def propose(self, tokens: list[int], k: int, sampler: Sampler | None = None):
        """(k proposed tokens, their draft distributions (k, V_draft) when sampling, else None)."""
        if k < 1:
            return [], None
        pc = self.cache
        # The draft reads text only: image soft tokens (and ids past its table) become padding.
        image, vocab = self.model.config.image_token_index, self.model.config.text.vocab_size
        tokens = [0 if t == image or t >= vocab else t for t in tokens]
        logits = pc.prefill(tokens)  # reuses what it holds; takes back last round's rejected guesses
        greedy = sampler is None or sampler.greedy
        history = mx.array(tokens) if sampler is not None and sampler.uses_history else None
        toks, qs = [], []
        try:
            for i in range(k):  # queued without reading anything back: one read at the end
                if greedy:
                    t = mx.argmax(logits, axis=-1)
                else:
                    q = sampler.probs(logits, history if history is not None else ())
                    t = mx.random.categorical(mx.log(q), axis=-1, key=sampler.next_key())
                    qs.append(q)
                    if history is not None:
                        history = mx.concatenate([history, t])
                toks.append(t)
                if i < k - 1:
                    logits = pc.feed_unread(t)
            values = mx.concatenate(toks).tolist()
        except BaseException:
            pc.realign()
            raise
        pc.settle(values[:-1])  # the last guess was never fed
        return values, (mx.concatenate(qs) if qs else None)

    def close(self) -> None:
        pass


def accept_greedy(logits: mx.array, drafts: list[int]) -> list[int]:
    """logits (k+1, V) after [last] + drafts -> the kept drafts plus the target's next token."""
    best = mx.argmax(logits, axis=-1).tolist()
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return drafts[:a] + [best[a]]


def accept_sampled(p: mx.array, q: mx.array | None, drafts: list[int], key=None) -> list[int]:
    """Rejection sampling. p: the target's distributions (k+1, V) after [last] + drafts; q: the
    proposer's (k, Vq) with Vq <= V (ids past Vq have q = 0), or None for a certain proposal."""
    k, V = len(drafts), p.shape[-1]
    keys = mx.random.split(key, 2) if key is not None else (None, None)
    if k == 0:
        return [mx.random.categorical(mx.log(p[-1:]), axis=-1, key=keys[1]).item()]
    d = mx.array(drafts)
    rows = mx.arange(k)
    if q is None:
        q = (mx.arange(V)[None] == d[:, None]).astype(p.dtype)
    elif q.shape[-1] < V:
        q = mx.concatenate([q, mx.zeros((k, V - q.shape[-1]), q.dtype)], axis=-1)
    pd, qd = p[rows, d], q[rows, d]
    u = mx.random.uniform(shape=(k,), key=keys[0])
    kept = u * qd < pd  # u < p/q, without dividing by a zero q
    residual = mx.maximum(p[:k] - q, 0.0)  # where a rejected guess is redrawn from
    with_bonus = mx.concatenate([residual, p[k:]], axis=0)
    draws = mx.random.categorical(mx.log(with_bonus), axis=-1, key=keys[1])
    kept, draws = kept.tolist(), draws.tolist()
    a = kept.index(False) if False in kept else k
    return drafts[:a] + [draws[a]]


def run_round(seq, vocab: int, check_drafts=None) -> list[int]:
    """One round for one sequence (the engine's row: prompt, tokens, cache, sampler, draft, k and
    counters): propose k tokens, check them all in one target pass, keep those the target agrees
    with plus its own next token, take the rest back from the cache; returns the tokens out.
    Before and after a round the cache holds prompt + tokens[:-1] (the last token out is not run)."""
    r = _Round(seq, vocab, check_drafts)
    logits = seq.cache.feed(r.fed, logits="all")  # (k+1, V)
    mx.eval(logits)
    return r.settle(logits, time.perf_counter() - r.t1)


def run_rounds(seqs: list, vocab: int, check_drafts=None, feed_rows=None) -> list[list[int]]:
    """One round for each of several sequences, their guesses all checked in one target pass:
    `feed_rows(caches, chunks) -> [(len(chunk), V) logits]` (prefill.feed_rows). `check_drafts` is
    used for the rows with a constraint (a matcher). Each row's tokens equal its own run_round's."""
    rounds = [_Round(s, vocab, check_drafts if s.matcher is not None else None) for s in seqs]
    t1 = time.perf_counter()
    logits = feed_rows([s.cache for s in seqs], [r.fed for r in rounds])
    mx.eval(logits)
    shared = (time.perf_counter() - t1) / len(seqs)  # the check's cost, shared by its rows
    return [r.settle(lg, shared) for r, lg in zip(rounds, logits)]


class _Round:
    """One row's round: its guesses (made at construction) and, once the target has checked them,
    what is kept (`settle`)."""

    def __init__(self, seq, vocab: int, check_drafts=None):
        self.seq, self.ctx, spec = seq, seq.prompt + seq.tokens, seq.speculation
        self.probe = spec.probe
        self.t0 = time.perf_counter()
        try:
            drafts, q = ([], None) if self.probe else spec.proposer.propose(self.ctx, spec.k, seq.sampler)
        except ValueError:  # e.g. past the draft model's context: go on without drafting
            drafts, q = [], None
            spec.give_up_soon()
        # A guess the target has no row for (a larger draft table) ends the guesses.
        n = next((i for i, t in enumerate(drafts[: spec.k]) if t >= vocab), min(len(drafts), spec.k))
        drafts, q = drafts[:n], (q[:n, :vocab] if q is not None else None)
        self.allowed = None
        if check_drafts is not None:  # a constrained row: guesses end at the first its constraint refuses
            drafts, self.allowed = check_drafts(seq, drafts)
            q = q[: len(drafts)] if q is not None else None
        self.drafts, self.q = drafts, q
        self.fed = [self.ctx[-1]] + drafts  # what the target runs: the last token out, then the guesses
        self.t1 = time.perf_counter()

    def settle(self, logits: mx.array, check_time: float) -> list[int]:
        """`logits` (n+1, V): the target's after `fed`. Keeps the agreed guesses plus one token of the
        target's, takes the rest back from the cache, updates the row's counters; returns the tokens out."""
        seq, drafts, n = self.seq, self.drafts, len(self.drafts)
        logits = masked(logits, self.allowed)
        if seq.sampler.greedy:
            out = accept_greedy(logits, drafts)
        else:
            if seq.sampler.uses_history:  # each position is penalized by what precedes it
                p = mx.concatenate([seq.sampler.probs(logits[i : i + 1], self.ctx + drafts[:i]) for i in range(n + 1)])
            else:
                p = seq.sampler.probs(logits)
            out = accept_sampled(p, self.q, drafts, seq.sampler.next_key())
        kept = len(out) - 1
        seq.cache.trim(n - kept)
        if self.allowed is not None and n:
            seq.matcher.rollback(n)  # back to the round's start: the engine feeds it every token out, as for plain rows
        seq.speculation.record(n, kept, self.t1 - self.t0, check_time, self.probe)
        return out
