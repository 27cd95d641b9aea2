"""The server's one model thread: it owns the engine, the cache pool and every MLX call.

The HTTP side hands it `Job`s (`submit`, `cancel`, thread-safe) and hears back through each job's
`send`: ("accepted",) once the prompt is in the engine, ("delta", text, logprobs) as text becomes
final, then ("done", finish_reason, usage) or ("error", status, message). Between engine steps it
takes new jobs (prompt building, the pool's cache for the conversation) and cancellations, so a
disconnected client frees its row within one step. Tokens become text, stop strings cut, through
streaming.TextStream. Chat with a base model is a transcript (prompt.py), ending at "User:". No HTTP here.

Split across ranks (`gemma3 serve --parallel`), every rank runs a Worker and the same steps. Rank 0
alone takes requests; each turn it posts what it took (requests, cancellations, stop) on a
distributed.Channel and every rank, rank 0 included, acts on it the turn after, so every decision
that follows (prompt building, the pool's choice of cache, stop strings, evictions) is made the
same way on every rank from the same inputs. The others run `follow()` in their main thread.
"""

from __future__ import annotations

import base64
import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from .. import distributed
from ..cache_pool import CachePool, common_prefix
from ..settings import Sampling
from ..cache_pool import cache_bytes as _bytes_of
from ..engine import STOP_IDS, Engine
from ..errors import Gemma3Error
from ..prompt import TRANSCRIPT_STOP, prompt_ids, uses_transcript
from ..speculate import DraftModel, PromptLookup
from ..streaming import TextStream
from ..memory import machine_memory
from .serve_admission import Admission, bound_process

# Seconds an idle server split across ranks waits for a request before telling the other ranks "nothing".
# MLX's ring backend spins a core while a collective waits, so after a few idle turns the other ranks
# sleep through most of each tick: the first request after a pause waits up to IDLE_TICK - PACE_MARGIN
# more; requests that follow each other closely wait for nothing.
IDLE_TICK = 0.25
PACE_MARGIN = 0.03
GATHER = 0.005  # seconds an idle server waits after a request for the rest of a burst
PACE_AFTER = 4  # idle turns in a row before the other ranks start sleeping


@dataclass
class Job:
    """One request as the model thread sees it. Either chat `messages` (content strings with an
    image marker where each of `images` goes) or a raw `prompt` (text or token ids)."""

    send: Callable[[tuple], None]  # called from the model thread; must not block
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    images: list[bytes] = field(default_factory=list)
    max_tokens: int | None = None  # None: up to the context
    settings: Sampling = field(default_factory=Sampling)  # the draw, stop strings, the constraint (settings.py)
    logprobs: int | None = None
    speculative: str | None = None  # "draft", "prompt-lookup" or "off"; None: the server's default
    adapter: str | None = None  # the LoRA adapter the request's `model` names (None: the base)
    context: int | None = None  # Ollama's num_ctx: prompt and reply within it (None, or more: the model's)
    # the model thread's bookkeeping
    uid: int | None = None
    cache: object = None
    stream: TextStream | None = None  # tokens -> text, stop strings cut
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    done: bool = False
    number: int | None = None  # split across ranks: its place in rank 0's order, the same on every rank

    def to_json(self) -> dict:
        """The request, as rank 0 sends it to the other ranks."""
        return {"messages": self.messages, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "images": [base64.b64encode(b).decode() for b in self.images], "settings": self.settings.to_json(),
                "logprobs": self.logprobs, "context": self.context, "adapter": self.adapter,
                "speculative": self.speculative}

    @classmethod
    def from_json(cls, d: dict) -> "Job":
        """A request replayed on another rank: it answers nobody (rank 0 answers the client)."""
        return cls(_nobody, messages=d["messages"], prompt=d["prompt"], max_tokens=d["max_tokens"],
                   images=[base64.b64decode(b) for b in d["images"]], settings=Sampling.from_json(d["settings"]),
                   logprobs=d["logprobs"], context=d.get("context"), adapter=d.get("adapter"),
                   speculative=d.get("speculative"))


def _nobody(item: tuple) -> None:
    pass


SPECULATIVE = ("off", "prompt-lookup", "draft")


def check_speculative(how: str, draft_model) -> None:
    if how not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)} (got {how!r})")
    if how == "draft" and draft_model is None:
        raise ValueError("speculative \"draft\" needs a draft model (gemma3 serve --draft-model MODEL)")


class Worker(threading.Thread):
    """`group`: the ranks one model is split across (rank 0 takes requests; the others call follow())."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, cache_bytes: int = 2 << 30,
                 kv_bits: int | None = None, max_queue: int = 64, prefill_chunk: int = 512, group=None,
                 memory: int | None = None, draft_model=None, speculative: str = "off"):
        super().__init__(name="gemma3-model", daemon=True)
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk, kv_bits=kv_bits,
                             tokenizer=tokenizer)
        check_speculative(speculative, draft_model)
        self.draft_model, self.speculative = draft_model, speculative  # speculation's proposer and default
        self.group, self.rank = group, group.rank() if group is not None else 0
        self.channel = distributed.Channel(group) if group is not None else None
        measure = _bytes_of if group is None else self._largest_share
        self.pool = CachePool(model, cache_bytes, measure=measure, **self.engine.cache_args)
        # admission by memory (`memory`: this machine's bytes, else memory.machine_memory())
        self.admission = Admission.for_model(model, self.engine.cache_args, memory)
        bound_process(machine_memory() if memory is None else memory)
        if group is not None:  # every rank admits alike: the smallest budget
            self.admission.budget = min(row[0] for row in distributed.gather([self.admission.budget], group))
        self._numbers = itertools.count()
        self._numbered: dict[int, Job] = {}  # split, other ranks: the live replayed jobs by number
        self._posted: list[tuple[str, Job | None]] = []  # rank 0: what it posted this turn
        self._quiet = 0  # idle turns in a row
        self.context = model.config.text.max_position_embeddings
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}
        self.max_pending = max_batch + max_queue  # requests admitted and not yet finished
        self.pending = 0
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(("requests", "rejected", "errors", "cancelled", "prompt_tokens",
                                       "cached_tokens", "generated_tokens", "draft_tokens", "accepted_tokens",
                                       "speculative_requests"), 0)
        self.gauges = {"queue_depth": 0, "active_sequences": 0, "kv_bytes": 0, "pool_bytes": 0, "pool_entries": 0}
        self._stopping = False
        self.stopped = threading.Event()  # the loop has ended
        self._used = False  # MLX's buffer cache may hold memory from work since the last clear

    # ------------------------------------------------------------------ any thread

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (nothing queued)."""
        with self._lock:
            if self.pending >= self.max_pending:
                self.counters["rejected"] += 1
                return False
            self.pending += 1
        self.inbox.put(("submit", job))
        return True

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def stop(self) -> None:
        """End the loop (the thread itself stays parked; see run)."""
        self.inbox.put(("stop", None))
        self.stopped.wait(timeout=10)

    # ------------------------------------------------------------------ the model thread

    def run(self) -> None:
        self._loop()
        # Park for good: when a thread that ran MLX ends, its thread-local compile cache is freed and
        # needs the GIL; if the interpreter is exiting by then, the process aborts ("terminate called
        # without an active exception", seen 1 run in 4). A parked daemon thread never ends.
        threading.Event().wait()

    def follow(self) -> None:
        """Ranks other than 0: replay rank 0's requests, step for step, until it stops (blocks)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 takes the requests: start() its worker")
        self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception as e:  # a bug must not kill the server: fail what runs, keep serving
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
            self._measure()
        self.engine.close()
        self.stopped.set()

    def _turn(self) -> None:
        if self.channel is None:
            self._apply(self._collect(block=not self.engine.has_work))
        else:  # what rank 0 posted last turn, acted on by every rank; then this turn's post
            self._apply(self._replay(self.channel.take()))
            if self._stopping:
                return
            if self.rank == 0:
                self._posted = self._collect(block=not self.engine.has_work)
                self.channel.post(self._encode(self._posted) if self._posted else None)
            else:
                if self._quiet >= PACE_AFTER:  # rank 0 posts again in about IDLE_TICK: spin only near then
                    time.sleep(IDLE_TICK - PACE_MARGIN)
                self.channel.post(None)
        if self.engine.has_work:
            self._step()

    def _collect(self, block: bool) -> list[tuple[str, Job | None]]:
        """What the HTTP side sent (waiting a while for something when `block`), up to a stop."""
        try:
            timeout = IDLE_TICK if self.channel is not None else 0.5
            items = [self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()]
        except queue.Empty:
            return []
        if block and items[0][0] == "submit":  # idle until now: a burst's other requests arrive within
            time.sleep(GATHER)  # milliseconds; taken together, their prompts share one prefill pass
        while items[-1][0] != "stop":
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        if self.channel is not None:
            for kind, job in items:
                if kind == "submit":
                    job.number = next(self._numbers)
        return items

    def _encode(self, items) -> bytes:
        rows = [{"op": kind, "n": job.number if job is not None else None,
                 **(job.to_json() if kind == "submit" else {})} for kind, job in items]
        return json.dumps(rows).encode()

    def _replay(self, data: bytes | None) -> list[tuple[str, Job | None]]:
        """The items rank 0 posted: its own objects on rank 0, rebuilt from `data` elsewhere."""
        if self.rank == 0:
            items, self._posted = self._posted, []
            return items
        items = []
        for row in json.loads(data) if data else ():
            job = None
            if row["op"] == "submit":
                job = Job.from_json(row)
                job.number = row["n"]
                self._numbered[job.number] = job
            elif row["op"] == "cancel":
                job = self._numbered.get(row["n"])
                if job is None:
                    continue  # over already (the same on rank 0: its cancel finds no running job)
            items.append((row["op"], job))
        return items

    def _apply(self, items: list[tuple[str, Job | None]]) -> None:
        self._start_ready()
        if not items:
            if not self.engine.has_work:
                self._quiet += 1
                if self._used:  # idle for a while: give MLX's buffer cache back, so memory follows
                    mx.clear_cache()  # the pool's bound (not at once: it waits for the step queued ahead)
                    self._used = False
            return
        self._used, self._quiet = True, 0
        for kind, job in items:
            if kind == "stop":
                self._stopping = True
                return
            if kind == "submit":
                self._start(job)
            elif job.uid is not None and job.uid in self.jobs:
                self.engine.cancel(job.uid)
            elif self.admission.drop(job):  # it was waiting for memory
                self.counters["cancelled"] += 1
                self._end(job)

    def _start_ready(self) -> None:
        """Start the requests that waited for memory and fit now."""
        for job, ready in self.admission.ready(self.pool):
            self._start(job, ready)

    def _largest_share(self, pc) -> int:
        """Split across ranks: the pool counts the largest rank's bytes of a cache (the same number
        everywhere, so every rank keeps and evicts the same conversations)."""
        return max(row[0] for row in distributed.gather([_bytes_of(pc)], self.group))

    def _start(self, job: Job, ready: tuple | None = None) -> None:
        """`ready`: (ids, blocks, tokens) of a request that waited for memory and is admitted now."""
        try:
            ids, blocks, tokens = ready or (*self._prompt(job), None)
            if len(ids) >= self.context:
                raise ValueError(f"the prompt has {len(ids)} tokens: more than the model's context of {self.context}")
            if tokens is None:
                max_tokens = job.max_tokens
                if job.context and job.context < self.context:  # Ollama's num_ctx: the reply stops at it
                    if len(ids) >= job.context:
                        raise ValueError(f"the prompt has {len(ids)} tokens: more than num_ctx {job.context}")
                    max_tokens = min(max_tokens or job.context, job.context - len(ids))
                tokens = self.admission.plan(len(ids), max_tokens)  # prompt + max_tokens, checked
                if not self.admission.admit(job, tokens, self.pool, (ids, blocks)):
                    return  # it waits for memory (admission.waiting)
            max_tokens = tokens - len(ids)
            job.cache = self.pool.take(ids, adapter=job.adapter)  # never another adapter's cache
            job.cache.marks |= self._branch_points(job, ids)  # with any the pool found
            draft = self._proposer(job)
            job.uid = self.engine.submit(ids, settings=job.settings, max_tokens=max_tokens, stop_ids=STOP_IDS,
                                         images=blocks, cache=job.cache, logprobs=job.logprobs, draft=draft)
            self.counters["speculative_requests"] += draft is not None
        except Exception as e:  # ValueError, Gemma3Error: the request's fault (a bad image, a prompt too long)
            if job.cache is not None:
                self.pool.give(job.cache)
            self._end(job)
            self.counters["errors"] += 1
            ours = isinstance(e, (ValueError, Gemma3Error))
            job.send(("error", 400 if ours else 500, " ".join(str(e).split()) if ours else f"{type(e).__name__}: {e}"))
            return
        transcript = self._transcript(job)
        stops = job.settings.stop
        job.stream = TextStream(self.tokenizer, [*stops, TRANSCRIPT_STOP] if transcript else stops,
                                strip=transcript)
        self.jobs[job.uid] = job
        self.counters["requests"] += 1
        job.send(("accepted", len(ids)))

    def _proposer(self, job: Job):
        """The request's speculative proposer (its own field, else the server's default), or None. Rows
        asking for logprobs, and a server split across ranks, decode plainly; a row for which speculation
        does not pay turns itself plain (engine.py)."""
        how = job.speculative or self.speculative
        check_speculative(how, self.draft_model)
        if how == "off" or job.logprobs is not None or self.group is not None:
            return None
        return DraftModel(self.draft_model) if how == "draft" else PromptLookup()

    def _branch_points(self, job: Job, ids: list[int]) -> frozenset[int]:
        """Where other conversations may branch off this one: the end of its system prompt (the
        common prefix of its ids with those of the system prompt alone). The pool forks there."""
        msgs = job.messages
        if not msgs or msgs[0].get("role") != "system" or len(msgs) < 2 or job.images:
            return frozenset()
        head, _ = prompt_ids(self.tokenizer, self.model.config, [msgs[0], {"role": "user", "content": ""}],
                             transcript=self._transcript(job))
        n = common_prefix(head, ids)
        return frozenset([n]) if 0 < n < len(ids) - 1 else frozenset()

    def _transcript(self, job: Job) -> bool:
        """A chat with a base model: a plain transcript (see prompt.py)."""
        return job.messages is not None and uses_transcript(self.model.config)

    def _prompt(self, job: Job):
        if job.messages is None:
            return prompt_ids(self.tokenizer, self.model.config, job.prompt)
        messages = []
        for m in job.messages:
            m = dict(m)
            if m["role"] == "assistant" and (ids := self.pool.reply_ids(m["content"])) is not None:
                m["ids"] = ids  # the reply as generated: what the cache of this conversation holds
            messages.append(m)
        return prompt_ids(self.tokenizer, self.model.config, messages, job.images or None,
                          transcript=self._transcript(job))

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # e.g. an image the vision tower cannot take: fail the sequences it left
            self._sweep(f"{type(e).__name__}: {' '.join(str(e).split())}")
            return
        for ev in events:
            job = self.jobs.get(ev.uid)
            if job is not None:
                self._event(job, ev)
        self._start_ready()

    def _event(self, job: Job, ev) -> None:
        if ev.finish_reason == "cancelled" or job.done:
            if ev.finish_reason:
                self._release(job, ev, cancelled=not job.done)
            return
        out, lps = "", None
        if ev.token is not None and ev.finish_reason != "stop":
            job.tokens.append(ev.token)
            out = job.stream.add(ev.token)
            if job.logprobs is not None:
                lps = [(ev.token, ev.logprob, ev.top_logprobs)]
        if ev.finish_reason and not job.stream.stopped:
            out += job.stream.finish()
        finish = "stop" if job.stream.stopped else ev.finish_reason
        if out or lps:
            job.text.append(out)
            job.send(("delta", out, lps))
        if finish:
            job.done = True
            s = ev.stats
            usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(job.tokens),
                     "cached_tokens": s.prompt_tokens - s.prefill_tokens}
            job.send(("done", finish, usage))
            if ev.finish_reason:
                self._release(job, ev)
            else:
                self.engine.cancel(job.uid)  # a stop string: the engine stops at the next step

    def _release(self, job: Job, ev, cancelled: bool = False) -> None:
        s = ev.stats
        self.counters["prompt_tokens"] += s.prompt_tokens
        self.counters["cached_tokens"] += s.prompt_tokens - s.prefill_tokens
        self.counters["draft_tokens"] += s.draft_tokens
        self.counters["accepted_tokens"] += s.accepted_tokens
        self.counters["generated_tokens"] += len(job.tokens)
        if cancelled:
            self.counters["cancelled"] += 1
        elif job.messages is not None:  # the reply's tokens up to a stop string: what the next turn sends back
            self.pool.remember("".join(job.text), job.stream.kept)
        self.jobs.pop(job.uid, None)
        self.pool.give(job.cache)
        self._end(job)

    def _end(self, job: Job) -> None:
        job.done, job.cache = True, None  # the pool owns the cache now: an evicted one is freed at once
        self._numbered.pop(job.number, None)
        self.admission.release(job, self.pool)
        with self._lock:
            self.pending -= 1

    def _sweep(self, message: str) -> None:
        """After a failed step: every job the engine no longer holds ends with an error."""
        e = self.engine
        live = {s.uid for s in itertools.chain(e.waiting, e.rows, e.spec)}
        for uid in [u for u in self.jobs if u not in live]:
            job = self.jobs.pop(uid)
            if not job.done:
                self.counters["errors"] += 1
                job.send(("error", 500, message))
            job.cache.realign()
            self.pool.give(job.cache)
            self._end(job)

    def _fail_all(self, message: str) -> None:
        try:
            self.engine.close()
        except Exception:
            self.engine = Engine(self.model, max_batch=self.engine.max_batch,
                                 prefill_chunk=self.engine.prefill_chunk, **self.engine.cache_args)
        for job in self.jobs.values():
            if not job.done:
                self.counters["errors"] += 1
                job.send(("error", 500, message))
            self._end(job)
        self.jobs.clear()
        for job in self.admission.clear():
            job.send(("error", 500, message))
            self._end(job)
        self.pool.clear()

    def _measure(self) -> None:
        e = self.engine
        active = sum(c.nbytes for c in e.layers) if e.layers else 0
        active += sum(s.cache.nbytes for s in itertools.chain(e.waiting, e.spec))
        self.gauges = {"queue_depth": len(e.waiting) + self.inbox.qsize() + len(self.admission.waiting),
                       "active_sequences": len(e.rows) + len(e.spec), "kv_bytes": active + self.pool.bytes,
                       "kv_reserved_bytes": self.admission.reserved, "kv_budget_bytes": self.admission.budget,
                       "pool_bytes": self.pool.bytes,
                       "pool_entries": len(self.pool), "time": time.time()}
