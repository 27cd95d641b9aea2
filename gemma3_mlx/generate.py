"""Generation: `generate_tokens` yields token ids; `stream_generate` turns them into text pieces.

Prefill runs in chunks and computes the output head only for the last prompt position (the
262K-row head is most of a small model's prefill otherwise). Stops on eos (1), `<end_of_turn>`
(106) or `max_tokens`. Sampling lives in sample.py, detokenizing in tokenizer.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx

from .prompt_cache import PromptCache
from .sample import make_sampler

STOP_IDS = (1, 106)  # <eos>, <end_of_turn>


@dataclass
class GenerationResponse:
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


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    *,
    cache: PromptCache | None = None,
    max_tokens: int = 256,
    sampler=None,
    stop_ids: Sequence[int] = STOP_IDS,
    prefill_chunk: int = 512,
    stats: dict | None = None,
    images: list | None = None,
) -> Iterator[int]:
    """Yield generated token ids (the stop token included, then it ends).

    With a `PromptCache`, only the part of the prompt it does not already hold is processed,
    and it keeps the conversation (prompt + reply) for the next call.
    """
    pc = PromptCache(model) if cache is None else cache
    sampler = sampler or make_sampler()
    history = list(prompt_ids)
    t0 = time.perf_counter()
    logits = pc.prefill(prompt_ids, prefill_chunk, images=images)
    pc.snapshot(logits)  # end of the prompt: regenerating this reply starts here
    token = sampler(logits, history)
    mx.eval(token)
    if stats is not None:
        stats["prompt_time"] = time.perf_counter() - t0
        stats["prefill_tokens"] = pc.reprocessed
        stats["decode_start"] = time.perf_counter()
    try:
        for n in range(max_tokens):
            tok = int(token.item())
            history.append(tok)
            if tok in stop_ids or n == max_tokens - 1:
                yield tok
                return
            # Queue the next step before handing this token out, so the model works while the caller prints.
            logits = pc.feed([tok])
            token = sampler(logits, history)
            mx.async_eval(token)
            yield tok
    finally:
        pc.snapshot()  # end of the reply: the next turn (or an edit of it) starts here


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return [int(t) for t in prompt]


def stream_generate(
    model,
    tokenizer,
    prompt,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    cache: PromptCache | None = None,
    prefill_chunk: int = 512,
    images: list | None = None,
    pan_and_scan: bool = False,
) -> Iterator[GenerationResponse]:
    """Stream text for `prompt`: raw text (BOS added), a list of token ids, or chat messages
    (`[{"role": "user", "content": "..."}]`, rendered with Gemma's chat format).
    Pass a `PromptCache` to reuse work across calls (multi-turn chat, a shared document).
    `images` (paths, bytes or PIL images) go where the text says `<start_of_image>`, else before
    the last user message; `pan_and_scan` adds the reference's crops of large or wide images."""
    from .tokenizer import StreamingDetokenizer

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    sampler = make_sampler(temp, top_k, top_p, min_p, repetition_penalty, seed=seed)
    blocks = None
    if images:
        from .prompt import build_prompt

        ids, blocks = build_prompt(tokenizer, prompt, model.config, images, pan_and_scan)
    else:
        ids = _prompt_ids(tokenizer, prompt)
    detok = StreamingDetokenizer(tokenizer)
    mx.reset_peak_memory()
    pc = PromptCache(model) if cache is None else cache
    stats: dict = {}
    n = 0

    def response(text, token, finish=None):
        now = time.perf_counter()
        decode_time = now - stats["decode_start"]
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prefill_tokens=stats["prefill_tokens"],
            prompt_tps=stats["prefill_tokens"] / max(stats["prompt_time"], 1e-9),
            generation_tokens=n,
            generation_tps=n / max(decode_time, 1e-9),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            kv_bytes=pc.nbytes,
            finish_reason=finish,
        )

    finish = "length"
    for token in generate_tokens(
        model, ids, cache=pc, max_tokens=max_tokens, sampler=sampler, prefill_chunk=prefill_chunk, stats=stats,
        images=blocks,
    ):
        n += 1
        if token in STOP_IDS:
            finish = "stop"
            break
        yield response(detok.add(token), token)
    yield response(detok.finalize(), None, finish)


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
