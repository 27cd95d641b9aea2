"""Generation front ends over the engine: tokens (`generate_tokens`), streamed text for one prompt
(`stream_generate`, `generate`) and for many at once (`stream_batch`, `batch_generate`).

All of them drive `engine.Engine`: one decode loop, batched or not. Prompts are raw text (BOS
added), token ids, or chat messages (Gemma's chat format); images go through prompt.py. Stops on
eos (1), `<end_of_turn>` (106) or `max_tokens`. Turning tokens into text is tokenizer.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from ._streams import any_thread
from .engine import STOP_IDS, Engine, Event, Stats
from .prompt import prompt_ids
from .prompt_cache import PromptCache
from .sample import Sampler
from .settings import DEFAULT, Sampling
from .speculate import DraftModel, PromptLookup
from .streaming import TextStream


@dataclass
class GenerationResponse:
    """One streamed piece. The closing piece of a stream has `token` None and a `finish_reason`."""

    text: str  # the text that became final with this step ("" when a character is still incomplete)
    token: int | None  # the token generated this step; None on the closing response
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens actually processed (the rest came from the prompt cache)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    kv_bytes: int  # memory held by the KV cache
    finish_reason: str | None = None  # "stop" (eos / end_of_turn), "length", or None while running
    logprob: float | None = None  # with logprobs=: the token's log-probability
    top_logprobs: tuple = ()  # with logprobs=k: (token, log-probability) of the k most likely
    stats: Stats | None = None  # the same figures as data (times in seconds)
    kept_tokens: int | None = None  # closing piece after a stop string: the generated tokens before it


@dataclass
class Completion:
    """A finished sequence of `batch_generate`."""

    text: str
    tokens: list[int]  # generated, the stop token excluded
    finish_reason: str
    stats: Stats


def _run(engine: Engine) -> Iterator[Event]:
    """Step an engine until it has nothing left; on any exit every sequence's cache stays consistent."""
    try:
        while engine.has_work:
            with any_thread():  # each step may run on another thread than the last (see _streams.py)
                events = engine.step()
            yield from events
    finally:
        with any_thread():
            engine.close()


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    *,
    cache: PromptCache | None = None,
    settings: Sampling | None = None,
    sampler=None,
    stop_ids: Sequence[int] = STOP_IDS,
    prefill_chunk: int = 512,
    images: list | None = None,
    tokenizer=None,
    **sampling,
) -> Iterator[int]:
    """Yield generated token ids (the stop token included, then it ends). Sampling as in
    `stream_generate` (a constraint needs the `tokenizer`).

    With a `PromptCache`, only the part of the prompt it does not already hold is processed,
    and it keeps the conversation (prompt + reply) for the next call.
    """
    engine = Engine(model, max_batch=1, prefill_chunk=prefill_chunk, tokenizer=tokenizer)
    engine.submit(prompt_ids, settings=settings_from(settings, sampling), sampler=sampler, stop_ids=stop_ids,
                  images=images, cache=cache)
    for event in _run(engine):
        yield event.token


def settings_from(settings: Sampling | None, overrides: dict) -> Sampling:
    """The sampling settings of a call: `settings` (default: Sampling()'s defaults) with the keyword
    arguments given for single settings (temp=0.7, max_tokens=64, stop=[...], constraint=...)."""
    return (settings or DEFAULT).replace(**overrides) if overrides else (settings or DEFAULT)


class _Pieces:
    """Events of one sequence -> GenerationResponses (text pieces, then the closing one). A stop
    string closes the stream ("stop"); the caller then stops the sequence (`stopped`)."""

    def __init__(self, tokenizer, cache: PromptCache, stop: Sequence[str] = (), strip: bool = False):
        self.text = TextStream(tokenizer, stop, strip)
        self.cache = cache

    @property
    def stopped(self) -> bool:
        return self.text.stopped

    def response(self, text, token, stats: Stats, finish=None, logprob=None, top=(), kept=None) -> GenerationResponse:
        return GenerationResponse(text, token, stats.prompt_tokens, stats.prefill_tokens, stats.prompt_tps,
                                  stats.generation_tokens, stats.generation_tps, mx.get_peak_memory() / 1e9,
                                  self.cache.nbytes, finish, logprob, top, stats, kept)

    def __call__(self, event: Event) -> list[GenerationResponse]:
        out = []
        if self.text.stopped:
            return out
        if event.token is not None and event.finish_reason != "stop":
            text = self.text.add(event.token)
            out.append(self.response(text, event.token, event.stats, None, event.logprob, event.top_logprobs))
        if event.finish_reason and not self.text.stopped:
            text = self.text.finish()  # the last characters may complete a stop string too
            finish = "stop" if self.text.stopped else event.finish_reason
            out.append(self.response(text, None, event.stats, finish, kept=self._kept()))
        elif self.text.stopped:
            out.append(self.response("", None, event.stats, "stop", kept=self._kept()))
        return out

    def _kept(self) -> int | None:
        return len(self.text.kept) if self.text.stopped else None


def _stream(engine: Engine, streams: dict) -> Iterator[tuple[int, GenerationResponse]]:
    """Step the engine, yielding (uid, piece) for each sequence's events (`streams`: uid -> _Pieces).
    A sequence a stop string ended is cancelled in the engine (it stops at the next step)."""
    for event in _run(engine):
        pieces = streams[event.uid]
        was_stopped = pieces.stopped
        for piece in pieces(event):
            yield event.uid, piece
        if pieces.stopped and not was_stopped:
            engine.cancel(event.uid)


def stream_generate(
    model,
    tokenizer,
    prompt,
    *,
    settings: Sampling | None = None,
    sampler: Sampler | None = None,
    stop_ids: Sequence[int] = STOP_IDS,
    cache: PromptCache | None = None,
    prefill_chunk: int = 512,
    images: list | None = None,
    pan_and_scan: bool = False,
    logprobs: int | None = None,
    draft_model=None,
    prompt_lookup: bool = False,
    draft=None,
    draft_tokens: int = 4,
    control_tokens: bool = False,
    transcript: bool = False,
    **sampling,
) -> Iterator[GenerationResponse]:
    """Stream text for `prompt`: raw text (BOS added), a list of token ids, or chat messages
    (`[{"role": "user", "content": "..."}]`, rendered with Gemma's chat format).
    Every piece but the last carries one token; the last has `token` None, the remaining text
    and the `finish_reason` ("stop" or "length").
    How to sample: `settings` (a `Sampling`: temp, top_k, top_p, min_p, repetition_penalty, seed,
    max_tokens, stop strings, and a `constraint` the reply must match), or any of those as keyword
    arguments (`temp=0.7, constraint=Constraint.json_schema(schema)`), which override `settings`.
    Pass a `PromptCache` to reuse work across calls (multi-turn chat, a shared document), and a
    `sampler` (`make_sampler(...)`) to keep one random stream across calls instead of `seed`.
    `images` (paths, bytes or PIL images) go where the text says `<start_of_image>`, else before
    the last user message; `pan_and_scan` adds the reference's crops of large or wide images.
    Speculative decoding (same output, greedy token for token, sampled in distribution): `draft_model`
    (a smaller Gemma 3 sharing the tokenizer), `prompt_lookup=True` (guesses copied from the context),
    or `draft` (a `speculate.DraftModel` / `PromptLookup` kept across calls, e.g. with the draft's own
    prompt cache); `draft_tokens` guesses per round to start with (adapted as it goes).
    `control_tokens`: read "<start_of_turn>" and other special-token strings typed in chat messages
    as tokens (off by default: they stay text, so a message cannot forge a turn; raw text prompts
    always read them). `stop`: stop strings: the text ends before the first one appears (it is not
    emitted; the closing piece says how many tokens came before it, `kept_tokens`).
    `transcript`: chat messages as a plain transcript, for a base model (see prompt.py).
    Any thread may call this, and continue a stream another thread began."""
    settings = settings_from(settings, sampling)
    ids, blocks = prompt_ids(tokenizer, model.config, prompt, images, pan_and_scan, control_tokens, transcript)
    mx.reset_peak_memory()
    pc = PromptCache(model) if cache is None else cache
    engine = Engine(model, max_batch=1, prefill_chunk=prefill_chunk, tokenizer=tokenizer)
    if draft is None and draft_model is not None:
        draft = DraftModel(draft_model)
    elif draft is None and prompt_lookup:
        draft = PromptLookup()
    uid = engine.submit(ids, settings=settings, sampler=sampler, stop_ids=stop_ids, images=blocks, cache=pc,
                        logprobs=logprobs, draft=draft, draft_tokens=draft_tokens)
    for _, piece in _stream(engine, {uid: _Pieces(tokenizer, pc, settings.stop, strip=transcript)}):
        yield piece


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def stream_batch(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    settings: Sampling | None = None,
    stop_ids: Sequence[int] = STOP_IDS,
    images: Sequence | None = None,
    pan_and_scan: bool = False,
    max_batch: int = 8,
    prefill_chunk: int = 512,
    control_tokens: bool = False,
    **sampling,
) -> Iterator[tuple[int, GenerationResponse]]:
    """Generate for several prompts at once: yields (prompt index, piece) as pieces become known,
    each stream ending with its closing piece. At most `max_batch` decode together; the rest wait
    and join as others finish. Each prompt's output is what it gives alone (the same `seed` gives
    each prompt its own, identical random stream). `images`: a list of images per prompt. Sampling:
    `settings` and keyword overrides, as in `stream_generate` (one constraint for every prompt)."""
    settings = settings_from(settings, sampling)
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk, tokenizer=tokenizer)
    streams = {}
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        ids, blocks = prompt_ids(tokenizer, model.config, prompt, imgs, pan_and_scan, control_tokens)
        cache = PromptCache(model)
        uid = engine.submit(ids, settings=settings, stop_ids=stop_ids, images=blocks, cache=cache)
        streams[uid] = (i, _Pieces(tokenizer, cache, settings.stop))
    order = {uid: i for uid, (i, _) in streams.items()}
    for uid, piece in _stream(engine, {uid: pieces for uid, (_, pieces) in streams.items()}):
        yield order[uid], piece


def batch_generate(model, tokenizer, prompts: Sequence, **kwargs) -> list[Completion]:
    """`stream_batch` collected: one `Completion` per prompt, in prompt order."""
    texts = [[] for _ in prompts]
    tokens = [[] for _ in prompts]
    done: list[Completion | None] = [None] * len(prompts)
    for i, piece in stream_batch(model, tokenizer, prompts, **kwargs):
        texts[i].append(piece.text)
        if piece.token is not None:
            tokens[i].append(piece.token)
        else:
            done[i] = Completion("".join(texts[i]), tokens[i], piece.finish_reason, piece.stats)
    return done
