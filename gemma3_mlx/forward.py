"""One forward pass as the runtime runs it: images placed, pipeline stages, the head where needed.

`Model.__call__(ids, cache) -> logits` is the plain text decoder. The prompt cache, the engine, batched
prefill and anyone with images run the model through here, for what a plain call leaves out:
- **images:** `encode_images` runs the vision tower (on the rank that holds it, when split: shard.py),
  `place_images` puts each image's features in place of its soft tokens' embeddings, and the image
  spans let an image's soft tokens see each other (model.with_image_blocks);
- **pipeline stages:** a split model's stage (shard.Stage) receives the previous stage's states instead
  of embedding, and passes its own on;
- **the head where it is needed:** every position, the last, one position per row, or none (`hidden`).

    logits = forward.logits(model, ids, cache, pixels=pixels)          # (1, L, vocab), with an image
    h = forward.hidden(model, ids, cache)                                # final-norm states, no head
"""

from __future__ import annotations

import mlx.core as mx

from . import shard
from .model import image_spans_of
from .vision import encode_images as _tower


def encode_images(model, pixels: mx.array) -> mx.array:
    """(N, H, W, 3) preprocessed images -> (N, mm_tokens_per_image, hidden) soft-token embeddings."""
    if model.config.vision is None:
        raise ValueError("this model has no vision tower (a text-only Gemma 3)")
    if pixels.ndim == 3:
        pixels = pixels[None]

    def encode(p):
        return _tower(model.vision_tower, model.multi_modal_projector, p)

    return encode(pixels) if shard.group_of(model) is None else shard.image_features(model, pixels, encode)


def place_images(h: mx.array, features: mx.array, spans) -> mx.array:
    """Embeddings `h` (1, L, hidden) with each image's soft tokens replaced by its features, in order
    (not scaled by sqrt(hidden), as the reference does). `spans`: [start, end) of each image in `h`."""
    feats = features.reshape(-1, h.shape[-1])
    n = sum(b - a for a, b in spans or ())
    if h.shape[0] != 1 or n != feats.shape[0]:
        raise ValueError(f"{n} image tokens in the prompt but {feats.shape[0]} image features (batch 1)")
    pos = mx.concatenate([mx.arange(a, b) for a, b in spans])
    h[0, pos] = feats.astype(h.dtype)
    return h


def hidden(model, ids: mx.array, cache: list, features: mx.array | None = None, spans=None) -> mx.array | None:
    """Final-norm hidden states (B, L, hidden) of `ids` (B, L) run on top of `cache`. `features`: the
    images' soft-token embeddings (from `encode_images`) for the image blocks at `spans` ([start, end)
    within this chunk; found from the ids when None, which reads them back from the device). An image
    block must not be split across calls (prompt_cache.py keeps them whole). None on a pipeline stage
    before the last: it passed its states on."""
    if features is not None and spans is None:
        spans = image_spans_of(ids[0].tolist(), model.config.image_token_index)

    def embed():
        h = model.embed(ids)
        return h if features is None else place_images(h, features, spans)

    stage = shard.stage_of(model)
    if stage is None:
        return model.blocks(embed(), cache, spans)
    return stage.run(model, ids, cache, embed, spans)


def logits(model, ids: mx.array, cache: list | None = None, *, at="all", pixels: mx.array | None = None,
           features: mx.array | None = None, spans=None) -> mx.array:
    """Logits of `ids` (B, L) on top of `cache` (a fresh one when None): at "all" positions (B, L, vocab),
    the "last" (B, 1, vocab), or at one position per row given as an int array (B,) -> (B, 1, vocab).
    `pixels`: the preprocessed images of the image blocks in `ids` (or their `features`)."""
    if cache is None:
        cache = model.make_cache()
    if pixels is not None:
        features = encode_images(model, pixels)
    h = hidden(model, ids, cache, features, spans)
    B, L = ids.shape
    if h is None:
        # A pipeline stage before the last has no logits (rank 0 alone does): these stand in, never
        # computed, and every rank goes on with the tokens shard.agree hands out.
        width = model.config.text.vocab_size
        return mx.broadcast_to(mx.zeros((1, 1, 1), model.model.norm.weight.dtype), (B, L if at == "all" else 1, width))
    if isinstance(at, str):
        if at == "last":
            h = h[:, -1:, :]
        elif at != "all":
            raise ValueError(f"at: 'all', 'last' or one position per row (got {at!r})")
    else:
        h = h[mx.arange(B), at][:, None, :]
    return model.head(h)

