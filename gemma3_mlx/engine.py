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
import numpy as np

from . import constrain, forward, shard
from .adapters import select
from .cache import ROLLBACK
from .prefill import Fill, feed_rows, plan, run_rows
from .prompt_cache import Prompt, PromptCache
from .sample import Sampler
from .settings import DEFAULT, Sampling
from .speculate import Speculation, run_round, run_rounds

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


class Holding(NamedTuple):
    """Engine.holding(): the sequences it holds (uids), how many wait for their prompt, how many decode
    (batched or speculating), and the bytes of their keys and values."""

    uids: frozenset
    waiting: int
    active: int
    kv_bytes: int


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
    def __init__(self, uid, prompt, cache, sampler, max_tokens, stop_ids, logprobs, steps, speculation=None,
                 matcher=None):
        self.checked: Prompt = prompt  # checked once at submit; batched prefill takes it as it is
        self.uid, self.prompt, self.cache, self.sampler = uid, prompt.ids, cache, sampler
        self.max_tokens, self.stop_ids, self.logprobs = max_tokens, frozenset(stop_ids), logprobs
        self.matcher = matcher  # llguidance matcher of the row's constraint: it has consumed every token read
        self.steps = steps  # the prompt cache's prefill, one chunk per next() (a prompt with images)
        self.fill = None  # batched prefill's progress (prefill.Fill), for a text-only prompt
        self.tokens: list[int] = []  # generated and read back
        self.history = None  # prompt + sampled tokens on the device, for a repetition penalty
        self.cancelled = False
        self.lp_pending = self.lp_next = None  # lazy log-probabilities of the pending / next token
        self.speculation: Speculation | None = speculation  # speculative decoding's state and policy
        self.speculating = speculation is not None  # until the policy switches the row to plain decoding
        self.t_submit = time.perf_counter()
        self.t_first = None
        self.prompt_time = 0.0

    def stats(self) -> Stats:
        now = time.perf_counter()
        s = self.speculation
        return Stats(len(self.prompt), self.cache.reprocessed, self.prompt_time, len(self.tokens),
                     now - self.t_first if self.t_first else 0.0, *((s.proposed, s.accepted, s.rounds) if s else (0, 0, 0)))


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
                 kv_group_size: int = 64, value_bits: int | None = None, rollback: int = ROLLBACK, tokenizer=None):
        if max_batch < 1 or prefill_chunk < 1 or rollback < 1:
            raise ValueError("max_batch, prefill_chunk and rollback must be >= 1")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.tokenizer = tokenizer  # needed only by constrained sequences (the grammar reads token bytes)
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
        self._joining: list | None = None  # rows joining during _prefill, merged at its end in one copy

    # ------------------------------------------------------------------ requests

    def submit(self, prompt, *, settings: Sampling | None = None, max_tokens: int | None = None,
               sampler: Sampler | None = None, stop_ids=STOP_IDS, images: list | None = None,
               cache: PromptCache | None = None, logprobs: int | None = None, draft=None,
               draft_tokens: int = 4, adapter: str | None = None) -> int:
        """Queue a sequence; returns its uid. `adapter`: the attached LoRA adapter this sequence runs
        (adapters.py; default: the model's own, if any), a model choice, kept out of the sampling settings. `prompt`: token ids (image blocks expanded, with one
        preprocessed image per block in `images`). `settings`: how to sample (settings.Sampling: the
        draw, max_tokens, and a constraint the reply must match; stop strings are the text layer's);
        `sampler` (a Sampler kept across calls, for its random stream) and `max_tokens` override
        theirs. `cache`: a PromptCache to continue (its common prefix with the prompt is reused, and
        it holds prompt + reply afterwards). `logprobs`: also report each token's log-probability and
        this many alternatives (0-20). `draft`: a proposer (speculate.DraftModel or PromptLookup) for
        speculative decoding, starting at `draft_tokens` per round (adapted to the acceptance, at most
        the caches' rollback)."""
        settings = settings or DEFAULT
        max_tokens = settings.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
        matcher = None
        if settings.constraint is not None:
            if self.tokenizer is None:
                raise ValueError("a constrained sequence needs the engine's tokenizer: Engine(model, tokenizer=...)")
            matcher = settings.constraint.matcher(self.vocabulary)
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20 (got {logprobs})")
        if cache is None:
            cache = PromptCache(self.model, **self.cache_args, adapter=adapter)
        elif adapter is not None and cache.adapter != adapter:
            raise ValueError(f"this cache holds adapter {cache.adapter!r}'s keys and values, not {adapter!r}'s")
        elif cache.cache_args != self.cache_args and (self.rows or self.waiting or self.max_batch > 1):
            raise ValueError(f"this cache was made with {cache.cache_args}, the engine batches {self.cache_args}")
        prompt = Prompt(prompt, self.model.config, images)  # the one check of the request's ids and images
        steps = cache.prefill_steps(prompt, self.prefill_chunk)
        if draft is not None and logprobs is not None:
            raise ValueError("logprobs are not reported while speculating")
        if draft is not None and shard.group_of(self.model) is not None:
            raise ValueError("speculative decoding does not run split across ranks (--parallel)")
        rollback = self.cache_args["rollback"]
        speculation = None if draft is None else Speculation(draft, max(1, min(draft_tokens, rollback)), rollback)
        seq = _Sequence(next(self._uids), prompt, cache, sampler or settings.sampler(), max_tokens, stop_ids,
                        logprobs, steps, speculation, matcher)
        self.waiting.append(seq)
        return seq.uid

    def holding(self) -> "Holding":
        """What the engine holds now (for a server's gauges and its clean-up after a failed step)."""
        kv = sum(c.nbytes for c in self.layers) if self.layers else 0
        kv += sum(s.cache.nbytes for s in itertools.chain(self.waiting, self.spec))
        uids = frozenset(s.uid for s in itertools.chain(self.waiting, self.rows, self.spec))
        return Holding(uids, len(self.waiting), len(self.rows) + len(self.spec), kv)

    def cancel(self, uid: int) -> None:
        """Stop a sequence at the next step (its cache keeps what it produced so far)."""
        for seq in itertools.chain(self.waiting, self.rows, self.spec):
            if seq.uid == uid:
                seq.cancelled = self._cancels = True

    @property
    def vocabulary(self) -> constrain.Vocabulary:
        """The tokenizer as the constraint library reads it, for this model's logits width (built once)."""
        return constrain.vocabulary(self.tokenizer, self.model.config.text.vocab_size)

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
        if len(speculating) > 1:  # every row's guesses checked in one target pass
            events += self._rounds(speculating)
        elif speculating:
            events += self._round(speculating[0])
        if not self.rows:
            return events
        asked = any(s.logprobs is not None for s in self.rows)
        ended = ()
        try:
            if any(s.matcher is not None for s in self.rows):
                # Constrained rows: queue step n+1's forward pass, then read step n's tokens, advance the
                # matchers and fill the masks on the host while the device runs; only then sample n+1.
                logits = self._forward()
                values = self.pending.tolist()
                ended = [self._advance(seq, tok) for seq, tok in zip(self.rows, values)]
                new = self._sample(logits, asked, self._masks(self.rows))
            else:
                new = self._sample(self._forward(), asked)
                values = self.pending.tolist()  # step n's tokens: the device is already on step n+1
            lps = [self._read_logprobs(seq) for seq in self.rows] if asked else None
        except BaseException:  # e.g. Ctrl-C: put every layer back where the rows are
            self._realign()
            raise
        leaving = []
        for i, (seq, tok) in enumerate(zip(self.rows, values)):
            seq.tokens.append(tok)
            finish = "stop" if tok in seq.stop_ids else "length" if len(seq.tokens) >= seq.max_tokens else None
            if ended and ended[i]:  # the constraint is complete: the row ends after this token, which it keeps
                finish = "done"
            if lps is None:
                events.append(Event(seq.uid, tok, _public(finish), seq.stats()))
            else:
                events.append(Event(seq.uid, tok, _public(finish), seq.stats(), *lps[i]))
                seq.lp_pending, seq.lp_next = seq.lp_next, None
            if finish == "done":
                events.append(Event(seq.uid, None, "stop", seq.stats()))
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
        """Prefill waiting sequences while there is room in the batch, several prompts per forward
        pass (prefill.py): about `prefill_chunk` prompt tokens per step while others decode (a long
        prompt does not stall them); when nothing decodes, passes until the first rows are ready
        (their first tokens go out; the other prompts go on beside their decoding). A prompt with
        images runs alone (prompt_cache.py keeps its blocks whole)."""
        self._joining = []
        try:
            return self._prefill_passes()
        finally:
            self._join_all()

    def _join_all(self) -> None:
        """The rows that joined during _prefill enter the batch: every cache copied once (merging them
        one by one copies the batch once per row)."""
        joining, self._joining = self._joining, None
        if not joining:
            return
        seqs, firsts = [s for s, _ in joining], [f for _, f in joining]
        if self.layers is None and len(seqs) == 1:
            self.layers, self.pending = seqs[0].cache.layers, firsts[0]
        else:
            parts = ([self.layers] if self.layers is not None else []) + [s.cache.layers for s in seqs]
            self.layers = [p[0].merge(*p[1:]) for p in zip(*parts)]
            self.pending = mx.concatenate(([self.pending] if self.pending is not None else []) + firsts)
        self.rows += seqs

    def _prefill_passes(self) -> list[Event]:
        events, budget = [], self.prefill_chunk
        while self.waiting and (budget > 0 or not (self.rows or self._joining or self.spec)):
            idle = not (self.rows or self._joining or self.spec)
            busy = len(self.rows) + len(self._joining) + len(self.spec)
            group = list(itertools.islice(self.waiting, self.max_batch - busy))
            if not group:
                break
            if not self._batchable(group[0]):
                events += self._prefill_alone(group[0])
                budget -= self.prefill_chunk
                continue
            group = [s for s in group if self._batchable(s)]
            for seq in group:
                if seq.fill is None:
                    try:
                        seq.fill = Fill(seq.cache, seq.checked)
                    except BaseException:
                        self.waiting.remove(seq)
                        raise
            cached = [s for s in group if s.fill.logits is not None]  # the whole prompt came from its cache
            for seq in cached:
                self.waiting.remove(seq)
                events += self._join(seq, seq.fill.logits) or []
            if cached:
                continue
            needs = [s.fill.need(self.prefill_chunk) for s in group]
            length = plan(needs, self.cache_args["rollback"] // 2)
            spent = list(itertools.accumulate(min(n, length) for n in needs))
            cap = budget if not idle else self.prefill_chunk  # a pass's activations: those of one chunk
            group = group[: max(1, sum(1 for x in spent if x <= cap))]  # at least one row
            try:
                outs = run_rows(self.model, [s.fill for s in group], length)
            except BaseException:
                for seq in group:
                    self.waiting.remove(seq)
                    seq.cache.realign()
                raise
            budget -= spent[len(group) - 1]
            for seq, logits in zip(group, outs):
                if logits is not None:
                    self.waiting.remove(seq)
                    events += self._join(seq, logits) or []
            going = [c.state for s in group if not s.fill.done for c in s.cache.layers]
            if going:
                mx.eval(going)  # bound the lazy graph: one pass at a time
        return events

    def _batchable(self, seq: _Sequence) -> bool:
        """A text-only prompt (images go through their PromptCache's own steps)."""
        cfg = self.model.config
        return cfg.vision is None or cfg.image_token_index not in seq.prompt

    def _prefill_alone(self, seq: _Sequence) -> list[Event]:
        """One chunk of a prompt with images, through its PromptCache's own steps."""
        try:
            logits = next(seq.steps)
        except BaseException:
            self.waiting.remove(seq)  # its cache stays consistent (prompt_cache.py realigns it)
            raise
        if logits is None:
            return []
        self.waiting.remove(seq)
        return self._join(seq, logits) or []

    def _join(self, seq: _Sequence, logits: mx.array) -> None:
        if seq.sampler.uses_history:
            seq.history = mx.array(seq.prompt)
        drawn = logits if seq.matcher is None else constrain.masked(logits, self._masks([seq]))  # the snapshot keeps them whole
        first = shard.agree(self.model, seq.sampler(drawn, seq.history if seq.history is not None else ()))
        if seq.logprobs is not None:
            self._logprobs(logits, first, [seq])
            seq.lp_pending, seq.lp_next = seq.lp_next, None
        mx.eval(first)  # once per sequence: the time to its first token
        seq.t_first = time.perf_counter()
        seq.prompt_time = seq.t_first - seq.t_submit
        seq.cache.snapshot(logits)  # end of the prompt: regenerating the reply starts here
        if seq.history is not None:
            seq.history = mx.concatenate([seq.history, first])
        if seq.speculating:  # speculative rows run their own rounds; the first token is known
            return self._emit_spec(seq, [first.item()])
        self._merge(seq, first)

    def _merge(self, seq: _Sequence, first: mx.array) -> None:
        """Add a row to the batch, `first` (1,) being its next token to feed (during _prefill: at its
        end, with every row that joins in it)."""
        if self._joining is not None:
            self._joining.append((seq, first))
            return
        if self.layers is None:
            self.layers, self.pending = seq.cache.layers, first
        else:
            self.layers = [a.merge(b) for a, b in zip(self.layers, seq.cache.layers)]
            self.pending = mx.concatenate([self.pending, first])
        self.rows.append(seq)

    # ------------------------------------------------------------------ speculation

    def _round(self, seq: _Sequence) -> list[Event]:
        """One speculative round of one row (speculate.run_round), then its tokens out."""
        out = run_round(seq, self.model.config.text.vocab_size, self._check_drafts if seq.matcher is not None else None)
        events = self._emit_spec(seq, out)
        if seq in self.spec and seq.speculation.switch_off():
            self._to_plain(seq)
        return events

    def _rounds(self, seqs: list[_Sequence]) -> list[Event]:
        """One speculative round for each row, every row's guesses checked in one target pass
        (speculate.run_rounds over prefill.feed_rows), then each row's tokens out."""
        feed = lambda caches, chunks: feed_rows(self.model, caches, chunks)  # noqa: E731
        outs = run_rounds(seqs, self.model.config.text.vocab_size, self._check_drafts, feed)
        events = []
        for seq, out in zip(seqs, outs):
            events += self._emit_spec(seq, out)
            if seq in self.spec and seq.speculation.switch_off():
                self._to_plain(seq)
        return events

    def _emit_spec(self, seq: _Sequence, out: list[int]) -> list[Event]:
        if seq not in self.spec:
            self.spec.append(seq)
        events = []
        for tok in out:
            seq.tokens.append(tok)
            finish = "stop" if tok in seq.stop_ids else "length" if len(seq.tokens) >= seq.max_tokens else None
            if self._advance(seq, tok):
                finish = "done"
            events.append(Event(seq.uid, tok, _public(finish), seq.stats()))
            if finish == "done":
                events.append(Event(seq.uid, None, "stop", seq.stats()))
            if finish:
                self.spec.remove(seq)
                self._finish_spec(seq, finish)
                break
        return events

    @staticmethod
    def _finish_spec(seq: _Sequence, finish: str | None) -> None:
        """The row's cache ends holding prompt + reply (at most its last token not yet run)."""
        seq.matcher = None
        extra = len(seq.cache.tokens) - (len(seq.prompt) + len(seq.tokens) - (finish == "stop"))
        if extra > 0:
            seq.cache.trim(extra)
        seq.cache.snapshot()

    def _to_plain(self, seq: _Sequence) -> None:
        """Speculation does not pay for this row: it joins the batch and decodes one token a step."""
        self.spec.remove(seq)
        seq.speculating = False  # its counters stay, for its statistics
        logits = seq.cache.feed(seq.tokens[-1:])  # the last token out was never run: its successor is pending
        history = ()
        if seq.sampler.uses_history:
            history = seq.history = mx.array(seq.prompt + seq.tokens)
        nxt = seq.sampler(logits if seq.matcher is None else constrain.masked(logits, self._masks([seq])), history)
        if seq.history is not None:
            seq.history = mx.concatenate([seq.history, nxt])
        self._merge(seq, nxt)

    def _forward(self) -> mx.array:
        """Queue one forward pass for every row from the pending (lazy) tokens: logits (B, V)."""
        select(self.model, [s.cache.adapter for s in self.rows])  # each row's LoRA adapter (or none)
        logits = forward.logits(self.model, self.pending[:, None], self.layers)[:, -1, :]  # one token per row
        mx.async_eval(logits)
        return logits

    def _sample(self, logits: mx.array, logprobs: bool, allowed: mx.array | None = None):
        """Queue each row's draw from `logits` (masked to `allowed` for constrained rows); returns the
        next tokens, lazily. `logprobs`: some row asked for log-probabilities (of the unmasked logits)."""
        rows = self.rows
        raw, logits = logits, constrain.masked(logits, allowed)
        if all(s.sampler.greedy for s in rows):
            new = shard.agree(self.model, mx.argmax(logits, axis=-1))  # split across ranks: rank 0's tokens everywhere
        else:
            new = shard.agree(self.model, mx.concatenate([s.sampler(logits[i : i + 1], s.history if s.history is not None
                                                             else ()) for i, s in enumerate(rows)]))
            for i, s in enumerate(rows):
                if s.history is not None:
                    s.history = mx.concatenate([s.history, new[i : i + 1]])
        if logprobs:
            self._logprobs(raw, new, rows)
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
            seq.matcher = None
            # every token read was also fed
            seq.cache.hand_back(self.layers if len(self.rows) == 1 else [c.select([i]) for c in self.layers],
                                seq.prompt + seq.tokens)
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

    # ------------------------------------------------------------------ constraints

    def _advance(self, seq: _Sequence, tok: int) -> bool:
        """Feed a token read back to the row's matcher; True when the constraint is now complete (only
        the end may follow). A token the constraint refuses cannot have been sampled: assert it."""
        m = seq.matcher
        if m is None:
            return False
        if tok in seq.stop_ids:
            assert m.is_accepting(), f"row {seq.uid} stopped (token {tok}) before its constraint was complete"
            return False
        assert m.consume_token(tok), f"row {seq.uid} sampled token {tok}, which its constraint refuses: {m.get_error()}"
        return m.is_stopped()

    def _fill(self, rows: list[_Sequence]) -> np.ndarray | None:
        """Host bitmask (B, words): each constrained row's allowed next tokens (its stop tokens where
        the constraint allows the end), every token for the others. None when no row is constrained."""
        live = [(s.matcher, i) for i, s in enumerate(rows) if s.matcher is not None]
        if not live:
            return None
        mask = self.vocabulary.fill(live, len(rows))
        bits = mask.view(np.uint32)
        for m, i in live:
            stops = rows[i].stop_ids
            if constrain.allows(mask[i], constrain.EOS_ID):  # the end is allowed: as any of the row's stop tokens
                for t in stops:
                    bits[i, t >> 5] |= np.uint32(1 << (t & 31))
                if constrain.EOS_ID not in stops:
                    bits[i, constrain.EOS_ID >> 5] &= ~np.uint32(1 << constrain.EOS_ID)
        return mask

    def _masks(self, rows: list[_Sequence]) -> mx.array | None:
        """The same as (B, V) booleans on the device."""
        mask = self._fill(rows)
        return None if mask is None else constrain.allowed(mask, self.vocabulary.width)

    def _check_drafts(self, seq: _Sequence, drafts: list[int]) -> tuple[list[int], mx.array]:
        """A speculating row's guesses against its constraint: the longest allowed run (consumed by the
        matcher; the round rolls back what the target rejects) and the masks (n+1, V) for the target's
        positions after [last] + that run."""
        m, kept, rows = seq.matcher, [], []
        for i in range(len(drafts) + 1):
            rows.append(self._fill([seq])[0])
            if i == len(drafts) or drafts[i] in seq.stop_ids or not constrain.allows(rows[-1], drafts[i]):
                break
            m.consume_token(drafts[i])
            kept.append(drafts[i])
        return kept, constrain.allowed(np.stack(rows), self.vocabulary.width)


def _public(finish: str | None) -> str | None:
    """A row whose constraint completed ends with a closing "stop" event after its last token."""
    return None if finish == "done" else finish
