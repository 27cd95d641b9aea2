"""Requests on their way into the model thread, in one order on every rank.

The HTTP side hands the model thread `Job`s through a `RequestQueue`: `submit`, `cancel` and `stop`
are thread-safe and never wait for the model. A bounded count of requests in flight (submitted and
not yet ended) makes a full server refuse at once (the caller's 503). Between engine steps the model
thread `take`s what came, and calls `ended` when a job is over.

Split across ranks (`gemma3 serve --parallel`), rank 0 alone takes requests: each turn it posts what it
took (requests, cancellations, stop) on a distributed.Channel, and every rank, rank 0 included, takes
that post the turn after, so every rank acts on the same items in the same order. The other ranks
post nothing and, while idle, sleep through most of each tick. What a taken job does is the worker's.
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

from .. import distributed
from ..settings import Sampling
from ..streaming import TextStream
from .serve_metrics import Metrics

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
    stream: TextStream | None = None  # the reply: its tokens, and their text with stop strings cut
    text: list[str] = field(default_factory=list)  # the text sent so far, piece by piece
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


Item = tuple[str, "Job | None"]  # ("submit", job), ("cancel", job) or ("stop", None)


class RequestQueue:
    """`max_in_flight`: the most requests submitted and not yet ended (more are refused). `group`: the
    ranks one model is split across (None: this process alone)."""

    def __init__(self, max_in_flight: int, metrics: Metrics, group=None):
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards in_flight (the HTTP side adds, the model thread takes away)
        self.rank = group.rank() if group is not None else 0
        self.channel = distributed.Channel(group) if group is not None else None
        self._numbers = itertools.count()  # rank 0: the order it posts requests in
        self._replayed: dict[int, Job] = {}  # other ranks: the live replayed jobs by number
        self._posted: list[Item] = []  # rank 0: what it posted this turn
        self._took = False  # this turn's take had items
        self._idle_turns = 0  # turns in a row with nothing taken and nothing to step

    # ------------------------------------------------------------------ the HTTP side (any thread)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when max_in_flight are in flight already (nothing queued)."""
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.metrics.counters["rejected"] += 1
                return False
            self.in_flight += 1
        self.inbox.put(("submit", job))
        return True

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    # ------------------------------------------------------------------ the model thread

    def take(self, idle: bool) -> list[Item]:
        """This turn's items, up to a stop. Alone: what the HTTP side sent (waiting a while for something
        when `idle`, the engine having no work). Split: what rank 0 posted last turn, on every rank."""
        if self.channel is None:
            return self._collect(idle)
        items = self._replay(self.channel.take())
        self._took = bool(items)
        return items

    def post(self, idle: bool) -> None:
        """Split, once this turn's items are acted on: rank 0 posts what the HTTP side sent since (waiting
        a while for something when `idle`); the others post nothing, after a nap when long idle."""
        if self.channel is None:
            return
        if self._took:
            self._idle_turns = 0
        elif idle:
            self._idle_turns += 1
        if self.rank == 0:
            self._posted = self._collect(idle)
            self.channel.post(self._encode(self._posted) if self._posted else None)
        else:
            if self._idle_turns >= PACE_AFTER:  # rank 0 posts again in about IDLE_TICK: spin only near then
                time.sleep(IDLE_TICK - PACE_MARGIN)
            self.channel.post(None)

    def ended(self, job: Job) -> None:
        """A job is over: it leaves the count in flight (and, on the other ranks, the replayed jobs)."""
        self._replayed.pop(job.number, None)
        with self._lock:
            self.in_flight -= 1

    def _collect(self, block: bool) -> list[Item]:
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

    def _encode(self, items: list[Item]) -> bytes:
        rows = [{"op": kind, "n": job.number if job is not None else None,
                 **(job.to_json() if kind == "submit" else {})} for kind, job in items]
        return json.dumps(rows).encode()

    def _replay(self, data: bytes | None) -> list[Item]:
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
                self._replayed[job.number] = job
            elif row["op"] == "cancel":
                job = self._replayed.get(row["n"])
                if job is None:
                    continue  # over already (the same on rank 0: its cancel finds no running job)
            items.append((row["op"], job))
        return items
