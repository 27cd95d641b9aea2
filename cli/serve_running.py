"""The jobs running in the engine: what each client hears, and the end of each job.

`Running` holds the engine and the started jobs by the engine's uid. Each step's events become the
job's messages (`Job.send`): ("accepted", prompt_tokens) once it is in the engine, ("delta", text,
logprobs) as text becomes final (tokens to text and stop strings through streaming.TextStream), then
("done", finish_reason, usage) or ("error", status, message). A job that ends, however it ends, gives
its cache back to the pool, its reservation back to admission and its place back to the queue (`end`).
A failed step fails the jobs it left; a failure of the loop fails them all (`fail_all`). Building a
job's prompt and starting it is serve_start.py's; no HTTP here.
"""

from __future__ import annotations


from ..cache_pool import CachePool
from ..engine import Engine
from ..errors import Gemma3Error
from .serve_admission import Admission
from .serve_metrics import Metrics
from .serve_queue import Job, RequestQueue


class Running:
    def __init__(self, engine: Engine, pool: CachePool, admission: Admission, queue: RequestQueue,
                 metrics: Metrics):
        self.engine, self.pool, self.admission, self.queue = engine, pool, admission, queue
        self.counters = metrics.counters
        self.jobs: dict[int, Job] = {}  # by the engine's uid

    def add(self, job: Job, prompt_tokens: int, speculative: bool) -> None:
        """A job the engine took (job.uid, job.cache and job.stream set)."""
        self.jobs[job.uid] = job
        self.counters["speculative_requests"] += speculative
        self.counters["requests"] += 1
        job.send(("accepted", prompt_tokens))

    def refuse(self, job: Job, e: Exception) -> None:
        """A job that could not start: a ValueError or Gemma3Error is the request's fault (a bad image,
        a prompt too long: a 400), anything else ours (a 500)."""
        if job.cache is not None:
            self.pool.give(job.cache)
        self.end(job)
        self.counters["errors"] += 1
        ours = isinstance(e, (ValueError, Gemma3Error))
        job.send(("error", 400 if ours else 500, " ".join(str(e).split()) if ours else f"{type(e).__name__}: {e}"))

    def cancel(self, job: Job) -> None:
        """Its client left: a running job stops at the next step; one waiting for memory ends now."""
        if job.uid is not None and job.uid in self.jobs:
            self.engine.cancel(job.uid)
        elif self.admission.drop(job):
            self.counters["cancelled"] += 1
            self.end(job)

    def step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # e.g. an image the vision tower cannot take: fail the sequences it left
            self._sweep(f"{type(e).__name__}: {' '.join(str(e).split())}")
            return
        for ev in events:
            job = self.jobs.get(ev.uid)
            if job is not None:
                self._event(job, ev)

    def _event(self, job: Job, ev) -> None:
        if ev.finish_reason == "cancelled" or job.done:
            if ev.finish_reason:
                self._release(job, ev, cancelled=not job.done)
            return
        out, lps = "", None
        if ev.token is not None and ev.finish_reason != "stop":
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
            usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(job.stream.tokens),
                     "cached_tokens": s.prompt_tokens - s.prefill_tokens}
            job.send(("done", finish, usage))
            if ev.finish_reason:
                self._release(job, ev)
            else:
                self.engine.cancel(job.uid)  # a stop string: the engine stops at the next step

    def _release(self, job: Job, ev, cancelled: bool = False) -> None:
        """The engine let go of a job (its last event): count it, and give its cache to the pool."""
        s = ev.stats
        self.counters["prompt_tokens"] += s.prompt_tokens
        self.counters["cached_tokens"] += s.prompt_tokens - s.prefill_tokens
        self.counters["draft_tokens"] += s.draft_tokens
        self.counters["accepted_tokens"] += s.accepted_tokens
        self.counters["generated_tokens"] += len(job.stream.tokens)
        if cancelled:
            self.counters["cancelled"] += 1
        elif job.messages is not None:  # the reply's tokens up to a stop string: what the next turn sends back
            self.pool.remember("".join(job.text), job.stream.kept)
        self.jobs.pop(job.uid, None)
        self.pool.give(job.cache)
        self.end(job)

    def end(self, job: Job) -> None:
        job.done, job.cache = True, None  # the pool owns the cache now: an evicted one is freed at once
        self.admission.release(job, self.pool)
        self.queue.ended(job)

    def _sweep(self, message: str) -> None:
        """After a failed step: every job the engine no longer holds ends with an error."""
        live = self.engine.holding().uids
        for uid in [u for u in self.jobs if u not in live]:
            job = self.jobs.pop(uid)
            if not job.done:
                self.counters["errors"] += 1
                job.send(("error", 500, message))
            job.cache.realign()
            self.pool.give(job.cache)
            self.end(job)

    def fail_all(self, message: str) -> None:
        """After an error outside any one request: every job ends with a 500, the pool is emptied, and
        the engine is closed (or, if closing fails too, replaced by a new one with its settings)."""
        try:
            self.engine.close()
        except Exception:
            e = self.engine
            self.engine = Engine(e.model, max_batch=e.max_batch, prefill_chunk=e.prefill_chunk,
                                 tokenizer=e.tokenizer, **e.cache_args)
        for job in self.jobs.values():
            if not job.done:
                self.counters["errors"] += 1
                job.send(("error", 500, message))
            self.end(job)
        self.jobs.clear()
        for job in self.admission.clear():
            job.send(("error", 500, message))
            self.end(job)
        self.pool.clear()
