"""Starting a job: its prompt, admission by memory, a cache from the pool, its proposer, the engine.

A `Job` becomes token ids through prompt.py (the chat template; chat with a base model is a transcript
ending at "User:"), the assistant turns as they were generated where the pool remembers them. The ids
are checked against the model's context and Ollama's num_ctx, the job is admitted by memory
(serve_admission.py: it waits while it does not fit, and starts from `start_ready` once it does), and
it is submitted to the engine on the pool's cache for its conversation (cache_pool.py), marked where
other conversations may branch off it. A request's own fault ends it with a 400 (serve_running.py,
which also owns everything that happens to a job once started). No HTTP here.
"""

from __future__ import annotations

from .. import distributed
from ..cache_pool import CachePool, cache_bytes, common_prefix
from ..engine import STOP_IDS
from ..memory import machine_memory
from ..prompt import TRANSCRIPT_STOP, prompt_ids, uses_transcript
from ..speculate import DraftModel, PromptLookup
from ..streaming import TextStream
from .serve_admission import Admission, bound_process
from .serve_queue import Job
from .serve_running import Running

SPECULATIVE = ("off", "prompt-lookup", "draft")


def check_speculative(how: str, draft_model) -> None:
    if how not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)} (got {how!r})")
    if how == "draft" and draft_model is None:
        raise ValueError("speculative \"draft\" needs a draft model (gemma3 serve --draft-model MODEL)")


def make_pool(model, cache_args: dict, max_bytes: int, group=None) -> CachePool:
    """The pool of idle conversation caches. Split across ranks it counts the largest rank's bytes of a
    cache (the same number everywhere, so every rank keeps and evicts the same conversations)."""
    def largest_share(pc) -> int:
        return max(row[0] for row in distributed.gather([cache_bytes(pc)], group))

    return CachePool(model, max_bytes, measure=cache_bytes if group is None else largest_share, **cache_args)


def make_admission(model, cache_args: dict, memory: int | None = None, group=None) -> Admission:
    """Admission by memory (`memory`: this machine's bytes, else memory.machine_memory()), the process
    bound to it; split across ranks, every rank admits alike: by the smallest budget."""
    admission = Admission.for_model(model, cache_args, memory)
    bound_process(machine_memory() if memory is None else memory)
    if group is not None:
        admission.budget = min(row[0] for row in distributed.gather([admission.budget], group))
    return admission


class Starter:
    """`speculative`: the server's default for a job that names none (checked by the caller:
    check_speculative); `group`: the ranks one model is split across (a split server does not speculate)."""

    def __init__(self, model, tokenizer, running: Running, pool: CachePool, admission: Admission, *,
                 draft_model=None, speculative: str = "off", group=None):
        self.model, self.tokenizer, self.running = model, tokenizer, running
        self.pool, self.admission = pool, admission
        self.draft_model, self.speculative, self.group = draft_model, speculative, group
        self.context = model.config.text.max_position_embeddings

    def start(self, job: Job, ready: tuple | None = None) -> None:
        """Submit `job` to the engine, or leave it waiting for memory, or refuse it. `ready`: (ids, blocks,
        tokens) of a job that waited for memory and is admitted now."""
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
            job.uid = self.running.engine.submit(ids, settings=job.settings, max_tokens=max_tokens, stop_ids=STOP_IDS,
                                                 images=blocks, cache=job.cache, logprobs=job.logprobs, draft=draft)
        except Exception as e:  # ValueError, Gemma3Error: the request's fault (a bad image, a prompt too long)
            self.running.refuse(job, e)
            return
        transcript = self._transcript(job)
        stops = job.settings.stop
        job.stream = TextStream(self.tokenizer, [*stops, TRANSCRIPT_STOP] if transcript else stops,
                                strip=transcript)
        self.running.add(job, len(ids), speculative=draft is not None)

    def start_ready(self) -> None:
        """Start the jobs that waited for memory and fit now."""
        for job, ready in self.admission.ready(self.pool):
            self.start(job, ready)

    def _proposer(self, job: Job):
        """The job's speculative proposer (its own field, else the server's default), or None. Rows
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
        """(ids, image blocks) of the job's prompt."""
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
