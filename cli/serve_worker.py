"""The server's one model thread: it owns the engine, the cache pool and every MLX call.

The HTTP side hands it `Job`s (`submit`, `cancel`: thread-safe, through serve_queue.RequestQueue) and
hears back through each job's `send` (the messages are serve_running.py's). Each turn the thread takes
what came (new jobs, cancellations, a stop), acts on it, and runs one engine step, so a disconnected
client frees its row within one step. The pieces, one concern each: the queue and its replay across
ranks (serve_queue.py), starting a job (serve_start.py: prompt building, admission by memory, the
pool's cache), the running jobs (serve_running.py: events to the client, the end of a job), and the
counters and gauges (serve_metrics.py). No HTTP here.

Split across ranks (`gemma3 serve --parallel`), every rank runs a Worker and the same steps. Rank 0
alone takes requests; every rank acts on what it took the turn after (serve_queue.py), so every
decision that follows (prompt building, the pool's choice of cache, stop strings, evictions) is made
the same way on every rank from the same inputs. The others run `follow()` in their main thread.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from ..engine import Engine
from .serve_metrics import Metrics
from .serve_queue import Item, Job, RequestQueue
from .serve_running import Running
from .serve_start import Starter, check_speculative, make_admission, make_pool


class Worker(threading.Thread):
    """`max_batch` rows decode at once and `max_queue` more requests may wait (beyond: refused).
    `group`: the ranks one model is split across (rank 0 takes requests; the others call follow())."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, cache_bytes: int = 2 << 30,
                 kv_bits: int | None = None, max_queue: int = 64, prefill_chunk: int = 512, group=None,
                 memory: int | None = None, draft_model=None, speculative: str = "off"):
        super().__init__(name="gemma3-model", daemon=True)
        self.model, self.tokenizer = model, tokenizer
        engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk, kv_bits=kv_bits, tokenizer=tokenizer)
        check_speculative(speculative, draft_model)
        self.metrics = Metrics()
        self.queue = RequestQueue(max_batch + max_queue, self.metrics, group)
        self.pool = make_pool(model, engine.cache_args, cache_bytes, group)
        self.admission = make_admission(model, engine.cache_args, memory, group)
        self.running = Running(engine, self.pool, self.admission, self.queue, self.metrics)
        self.starter = Starter(model, tokenizer, self.running, self.pool, self.admission, draft_model=draft_model,
                               speculative=speculative, group=group)
        self._stopping = False
        self.stopped = threading.Event()  # the loop has ended
        self._used = False  # MLX's buffer cache may hold memory from work since the last clear

    @property
    def engine(self) -> Engine:
        return self.running.engine  # replaced if closing it after a failure fails too (Running.fail_all)

    # ------------------------------------------------------------------ any thread

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (nothing queued)."""
        return self.queue.submit(job)

    def cancel(self, job: Job) -> None:
        self.queue.cancel(job)

    def stop(self) -> None:
        """End the loop (the thread itself stays parked; see run)."""
        self.queue.stop()
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
        if self.queue.rank == 0:
            raise RuntimeError("rank 0 takes the requests: start() its worker")
        self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception as e:  # a bug must not kill the server: fail what runs, keep serving
                self.running.fail_all(f"internal error: {type(e).__name__}: {e}")
            self.metrics.measure(self.engine, self.queue, self.admission, self.pool)
        self.engine.close()
        self.stopped.set()

    def _turn(self) -> None:
        self._apply(self.queue.take(idle=not self.engine.has_work))
        if self._stopping and self.queue.channel is not None:
            return  # every rank took the stop: none posts or steps again
        self.queue.post(idle=not self.engine.has_work)  # split across ranks: this turn's, acted on next turn
        if self.engine.has_work:
            self.running.step()
            self.starter.start_ready()

    def _apply(self, items: list[Item]) -> None:
        self.starter.start_ready()
        if not items:
            if not self.engine.has_work and self._used:  # idle for a while: give MLX's buffer cache back, so
                mx.clear_cache()  # memory follows the pool's bound (not at once: it waits for the step queued ahead)
                self._used = False
            return
        self._used = True
        for kind, job in items:
            if kind == "stop":
                self._stopping = True
                return
            if kind == "submit":
                self.starter.start(job)
            else:
                self.running.cancel(job)
