"""The generation engine: one decode loop for every front end (generate, chat, batches, the server).

Sequences are submitted with their own prompt, sampler, limits and `PromptCache`. A prompt is
prefilled a chunk per step while others decode (a long prompt does not stall them); then the
sequence joins the batch, and every step runs one forward pass for all rows, each row at its own
position. A sequence leaves when it stops, hits its limit or is cancelled; its caches go back into
its `PromptCache`, holding exactly the prompt and the tokens it produced (a multi-turn chat or a
server conversation continues from there).

The loop never waits on the host before queuing work: step n+1 is built from step n's still-lazy
tokens, and only then are step n's values read. So each sequence runs one token ahead; the token
queued after a stop is taken back from the caches exactly (window rings roll back, cache.py).
This module does no text decoding and no I/O: generate.py turns tokens into text.
"""

from __future__ import annotations

import atexit
import itertools
import time
from collections import deque
from typing import NamedTuple

import mlx.core as mx

from .adapters import select
from .cache import ROLLBACK
from .prompt_cache import PromptCache, check_ids
from .sample import Sampler, make_sampler
from .speculate import paying, run_round

STOP_IDS = (1, 106)  # <eos>, <end_of_turn>: the one list of default stop tokens

# A step queued ahead and never read may still be running when Python exits; MLX's CPU backend can
# hang if the interpreter tears down under it (seen here 4 times in 6). Let it finish first.
atexit.register(mx.synchronize)


class Stats(NamedTuple):
    """Where a sequence's time went (seconds), as of the event that carries it."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually processed (the rest came from its cache)
    prompt_time: float = 0.0  # submit (or join) to the first token
    generation_tokens: int = 0
    generation_time: float = 0.0  # first token to this event
    draft_tokens: int = 0  # speculative decoding: tokens proposed,
    accepted_tokens: int = 0  # ... kept,
    target_steps: int = 0  # ... and target forward passes that checked them

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / max(self.draft_tokens, 1)

    @property
    def tokens_per_step(self) -> float:
        """Tokens produced per target forward pass while speculating (1.0 without)."""
        return (self.accepted_tokens + self.target_steps) / max(self.target_steps, 1)

    @property
    def prompt_tps(self) -> float:
        return self.prefill_tokens / max(self.prompt_time, 1e-9)

    @property
    def generation_tps(self) -> float:
        """Decode speed: the tokens after the first, over the time since the first."""
        return max(self.generation_tokens - 1, 0) / max(self.generation_time, 1e-9)


class Event(NamedTuple):
    """One token of one sequence. `finish_reason` is "stop" (the token is a stop token), "length",
    "cancelled" (token is None) or None while the sequence runs. `logprob`/`top_logprobs` (natural
    log, of the model's distribution before sampling filters) only when the sequence asked."""

    uid: int
    token: int | None
    finish_reason: str | None
    stats: Stats
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class _Sequence:
    def __init__(self, uid, prompt, cache, sampler, max_tokens, stop_ids, logprobs, steps, draft=None, k=0):
        self.uid, self.prompt, self.cache, self.sampler = uid, prompt, cache, sampler
        self.max_tokens, self.stop_ids, self.logprobs = max_tokens, frozenset(stop_ids), logprobs
        self.steps = steps  # the prompt cache's prefill, one chunk per next()
        self.tokens: list[int] = []  # generated and read back
        self.history = None  # prompt + sampled tokens on the device, for a repetition penalty
        self.cancelled = False
        self.lp_pending = self.lp_next = None  # lazy log-probabilities of the pending / next token
        self.draft, self.k, self.k_max = draft, k, k  # speculative decoding: proposer, tokens per round
        self.proposed = self.accepted = self.rounds = 0
        self.spent = [0.0, 0.0, 1.0]  # recent seconds proposing, checking, and tokens gained per round
        self.plain_time = 0.0  # recent seconds of a plain one-token step (measured every 16th round)
        self.t_submit = time.perf_counter()
        self.t_first = None
        self.prompt_time = 0.0

    def stats(self) -> Stats:
        now = time.perf_counter()
        return Stats(len(self.prompt), self.cache.reprocessed, self.prompt_time, len(self.tokens),
                     now - self.t_first if self.t_first else 0.0, self.proposed, self.accepted, self.rounds)


class Engine:
    """Batched, continuous generation over one model.

        engine = Engine(model, max_batch=8)
        a = engine.submit(ids_a, max_tokens=64)
        b = engine.submit(ids_b, sampler=make_sampler(0.7, seed=1))
        while engine.has_work:
            for event in engine.step():
                ...

    `step()` returns the tokens that became known in that step (at most one per running sequence).
    Rows are independent: each row's tokens equal what that sequence gives alone. Not thread-safe:
    drive it from one thread (a server runs it in one worker and feeds it through a queue).
    """

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int = 512, kv_bits: int | None = None,
                 kv_group_size: int = 64, value_bits: int | None = None, rollback: int = ROLLBACK):
        if max_batch < 1 or prefill_chunk < 1 or rollback < 1:
            raise ValueError("max_batch, prefill_chunk and rollback must be >= 1")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.cache_args = {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "value_bits": value_bits,
                           "rollback": rollback}
        self.waiting: deque[_Sequence] = deque()
        self.rows: list[_Sequence] = []  # decoding, in batch order
        self.spec: list[_Sequence] = []  # decoding speculatively, each on its own caches
        self.layers: list | None = None  # the batch's caches, rows in `rows` order
        self.pending: mx.array | None = None  # (B,) sampled tokens, not yet fed nor read
        self._uids = itertools.count()
        self._ahead = None
        self._cancels = False  # a cancel() is waiting for the next step

    # ------------------------------------------------------------------ requests

    def submit(self, prompt, *, max_tokens: int = 256, sampler: Sampler | None = None, stop_ids=STOP_IDS,
               images: list | None = None, cache: PromptCache | None = None, logprobs: int | None = None,
               draft=None, draft_tokens: int = 4, adapter: str | None = None) -> int:
        """Queue a sequence; returns its uid. `adapter`: the attached LoRA adapter this sequence runs
        (adapters.py; default: the model's own, if any), a model choice, kept out of the sampling settings. `prompt`: token ids (image blocks expanded, with one
        preprocessed image per block in `images`). `cache`: a PromptCache to continue (its common
        prefix with the prompt is reused, and it holds prompt + reply afterwards). `logprobs`: also
        report each token's log-probability and this many alternatives (0-20). `draft`: a proposer
        (speculate.DraftModel or PromptLookup) for speculative decoding, starting at `draft_tokens`
        per round (adapted to the acceptance, at most the caches' rollback)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20 (got {logprobs})")
        if cache is None:
            cache = PromptCache(self.model, **self.cache_args, adapter=adapter)
        elif adapter is not None and cache.adapter != adapter:
            raise ValueError(f"this cache holds adapter {cache.adapter!r}'s keys and values, not {adapter!r}'s")
        elif cache.cache_args != self.cache_args and (self.rows or self.waiting or self.max_batch > 1):
            raise ValueError(f"this cache was made with {cache.cache_args}, the engine batches {self.cache_args}")
        prompt = [int(t) for t in prompt]
        check_ids(prompt, self.model.config)
        steps = cache.prefill_steps(prompt, self.prefill_chunk, images)
        if draft is not None and logprobs is not None:
            raise ValueError("logprobs are not reported while speculating")
        if draft is not None and self.model.group is not None:
            raise ValueError("speculative decoding does not run split across ranks (--parallel)")
        k = max(1, min(draft_tokens, self.cache_args["rollback"]))
        seq = _Sequence(next(self._uids), prompt, cache, sampler or make_sampler(), max_tokens, stop_ids, logprobs,
                        steps, draft, k)
        self.waiting.append(seq)
        return seq.uid

    def cancel(self, uid: int) -> None:
        """Stop a sequence at the next step (its cache keeps what it produced so far)."""
        for seq in itertools.chain(self.waiting, self.rows, self.spec):
            if seq.uid == uid:
                seq.cancelled = self._cancels = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows or self.spec)

    def close(self) -> None:
        """Cancel everything; every sequence's cache is left consistent."""
        inflight = self.pending
        for seq in self.waiting:
            seq.steps.close()
        self.waiting.clear()
        self._leave([(i, None) for i in range(len(self.rows))], None)
        for seq in self.spec:
            self._finish_spec(seq, None)
        self.spec.clear()
        mx.eval([a for a in (inflight, self._ahead) if a is not None])  # nothing left running behind us
        self._ahead = None

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[Event]:
        events = self._drop_cancelled() if self._cancels else []
        speculating = list(self.spec)  # a row joining now gets its first token out before its first round
        if self.waiting:
            events += self._prefill()
        for seq in speculating:
            events += self._round(seq)
        if not self.rows:
            return events
        asked = any(s.logprobs is not None for s in self.rows)
        try:
            new = self._decode(asked)
            values = self.pending.tolist()  # step n's tokens: the device is already on step n+1
            lps = [self._read_logprobs(seq) for seq in self.rows] if asked else None
        except BaseException:  # e.g. Ctrl-C: put every layer back where the rows are
            self._realign()
            raise
        leaving = []
        for i, (seq, tok) in enumerate(zip(self.rows, values)):
            seq.tokens.append(tok)
            finish = "stop" if tok in seq.stop_ids else "length" if len(seq.tokens) >= seq.max_tokens else None
            if lps is None:
                events.append(Event(seq.uid, tok, finish, seq.stats()))
            else:
                events.append(Event(seq.uid, tok, finish, seq.stats(), *lps[i]))
                seq.lp_pending, seq.lp_next = seq.lp_next, None
            if finish:
                leaving.append((i, finish))
        self.pending = new
        if leaving:
            self._leave(leaving, new)
        return events

    def _drop_cancelled(self) -> list[Event]:
        self._cancels = False
        events = []
        for seq in [s for s in self.waiting if s.cancelled]:
            seq.steps.close()
            self.waiting.remove(seq)
            events.append(Event(seq.uid, None, "cancelled", seq.stats()))
        gone = [(i, "cancelled") for i, s in enumerate(self.rows) if s.cancelled]
        if gone:
            events += [Event(self.rows[i].uid, None, "cancelled", self.rows[i].stats()) for i, _ in gone]
            self._leave(gone, self.pending)
        for seq in [s for s in self.spec if s.cancelled]:
            self.spec.remove(seq)
            self._finish_spec(seq, "cancelled")
            events.append(Event(seq.uid, None, "cancelled", seq.stats()))
        return events

    def _prefill(self) -> list[Event]:
        """Prefill waiting sequences while there is room in the batch: about `prefill_chunk` prompt
        tokens per step while others decode (a long prompt does not stall them), and every waiting
        prompt at once when nothing decodes (a batch starts together)."""
        events, budget = [], self.prefill_chunk
        idle = not (self.rows or self.spec)
        while self.waiting and len(self.rows) + len(self.spec) < self.max_batch and (idle or budget > 0):
            seq = self.waiting[0]
            before = len(seq.cache.tokens)
            try:
                logits = next(seq.steps)
            except BaseException:
                self.waiting.popleft()  # its cache stays consistent (prompt_cache.py realigns it)
                raise
            budget -= max(len(seq.cache.tokens) - before, 1)
            if logits is not None:
                self.waiting.popleft()
                events += self._join(seq, logits) or []
        return events

    def _join(self, seq: _Sequence, logits: mx.array) -> None:
        if seq.sampler.uses_history:
            seq.history = mx.array(seq.prompt)
        first = self.model.agree(seq.sampler(logits, seq.history if seq.history is not None else ()))
        if seq.logprobs is not None:
            self._logprobs(logits, first, [seq])
            seq.lp_pending, seq.lp_next = seq.lp_next, None
        mx.eval(first)  # once per sequence: the time to its first token
        seq.t_first = time.perf_counter()
        seq.prompt_time = seq.t_first - seq.t_submit
        seq.cache.snapshot(logits)  # end of the prompt: regenerating the reply starts here
        if seq.history is not None:
            seq.history = mx.concatenate([seq.history, first])
        if seq.draft is not None:  # speculative rows run their own rounds; the first token is known
            return self._emit_spec(seq, [first.item()])
        self._merge(seq, first)

    def _merge(self, seq: _Sequence, first: mx.array) -> None:
        """Add a row to the batch, `first` (1,) being its next token to feed."""
        if self.layers is None:
            self.layers, self.pending = seq.cache.layers, first
        else:
            self.layers = [a.merge(b) for a, b in zip(self.layers, seq.cache.layers)]
            self.pending = mx.concatenate([self.pending, first])
        self.rows.append(seq)

    # ------------------------------------------------------------------ speculation

    def _round(self, seq: _Sequence) -> list[Event]:
        """One speculative round of one row (speculate.run_round), then its tokens out."""
        out = run_round(seq, self.model.config.text.vocab_size)
        events = self._emit_spec(seq, out)
        if seq in self.spec and seq.rounds >= 8 and not paying(seq):
            self._to_plain(seq)
        return events

    def _emit_spec(self, seq: _Sequence, out: list[int]) -> list[Event]:
        if seq not in self.spec:
            self.spec.append(seq)
        events = []
        for tok in out:
            seq.tokens.append(tok)
            finish = "stop" if tok in seq.stop_ids else "length" if len(seq.tokens) >= seq.max_tokens else None
            events.append(Event(seq.uid, tok, finish, seq.stats()))
            if finish:
                self.spec.remove(seq)
                self._finish_spec(seq, finish)
                break
        return events

    @staticmethod
    def _finish_spec(seq: _Sequence, finish: str | None) -> None:
        """The row's cache ends holding prompt + reply (at most its last token not yet run)."""
        extra = len(seq.cache.tokens) - (len(seq.prompt) + len(seq.tokens) - (finish == "stop"))
        if extra > 0:
            seq.cache.trim(extra)
        seq.cache.snapshot()

    def _to_plain(self, seq: _Sequence) -> None:
        """Speculation does not pay for this row: it joins the batch and decodes one token a step."""
        self.spec.remove(seq)
        seq.draft = None
        logits = seq.cache.feed(seq.tokens[-1:])  # the last token out was never run: its successor is pending
        history = ()
        if seq.sampler.uses_history:
            history = seq.history = mx.array(seq.prompt + seq.tokens)
        nxt = seq.sampler(logits, history)
        if seq.history is not None:
            seq.history = mx.concatenate([seq.history, nxt])
        self._merge(seq, nxt)

    def _decode(self, logprobs: bool):
        """Queue one step for every row from the pending (lazy) tokens; returns the next tokens.
        `logprobs`: some row asked for log-probabilities."""
        select(self.model, [s.cache.adapter for s in self.rows])  # each row's LoRA adapter (or none)
        logits = self.model(self.pending[:, None], self.layers, logits="last")[:, -1, :]  # (B, V)
        rows = self.rows
        if all(s.sampler.greedy for s in rows):
            new = self.model.agree(mx.argmax(logits, axis=-1))  # split across ranks: rank 0's tokens everywhere
        else:
            new = self.model.agree(mx.concatenate([s.sampler(logits[i : i + 1], s.history if s.history is not None
                                                             else ()) for i, s in enumerate(rows)]))
            for i, s in enumerate(rows):
                if s.history is not None:
                    s.history = mx.concatenate([s.history, new[i : i + 1]])
        if logprobs:
            self._logprobs(logits, new, rows)
            mx.async_eval(new, *(x for s in rows if s.lp_next for x in s.lp_next if x is not None))
        else:
            mx.async_eval(new)
        return new


    @staticmethod
    def _logprobs(logits, tokens, rows) -> None:
        """Queue each asking row's log-probabilities of `tokens`: kept lazy on the row until read."""
        k = max(s.logprobs or 0 for s in rows)
        logits = logits.astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logp, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
        top = top_lp = None
        if k:
            top = mx.argpartition(-logp, k - 1, axis=-1)[:, :k]
            top_lp = mx.take_along_axis(logp, top, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            top, top_lp = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(top_lp, order, axis=-1)
        for i, s in enumerate(rows):
            if s.logprobs is not None:
                s.lp_next = (chosen[i], top[i, : s.logprobs] if k else None, top_lp[i, : s.logprobs] if k else None)

    def _read_logprobs(self, seq: _Sequence):
        if seq.lp_pending is None:
            return None, ()
        chosen, top, top_lp = seq.lp_pending
        seq.lp_pending = None
        alts = tuple(zip(top.tolist(), top_lp.tolist())) if top is not None else ()
        return chosen.item(), alts

    def _leave(self, leaving: list[tuple[int, str | None]], next_tokens) -> None:
        """Hand finished rows' caches back to their PromptCaches and drop them from the batch."""
        if not leaving:
            return
        gone = {i for i, _ in leaving}
        for i, finish in leaving:
            seq = self.rows[i]
            seq.cache.layers = self.layers if len(self.rows) == 1 else [c.select([i]) for c in self.layers]
            seq.cache.tokens = seq.prompt + seq.tokens  # every token read was also fed
            if finish == "stop":
                seq.cache.trim(1)  # the stop token is not part of the conversation
            seq.cache.snapshot()  # end of the reply: the next turn (or an edit of it) starts here
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.layers = self.pending = None
            self._ahead = next_tokens  # the look-ahead step nobody will read: close() waits for it
            return
        self.layers = [c.select(keep) for c in self.layers]
        self.pending = next_tokens[mx.array(keep)]

    def _realign(self) -> None:
        """After an interrupted step: every layer holds each row's prompt and read tokens again."""
        want = [len(s.prompt) + len(s.tokens) for s in self.rows]
        for c in self.layers or ():
            extra = [o - w for o, w in zip(c.offsets, want)]
            if any(extra):
                c.trim(extra)
