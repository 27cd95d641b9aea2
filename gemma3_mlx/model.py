"""The Gemma 3 decoder in MLX: `model(input_ids, cache) -> logits`, plain.

Five local (sliding-window) layers for every global one, QK-norm, `(1 + w)` RMSNorms, two
RoPE bases, tied output head. Sizes come from the config alone (270M to 27B). This module
does no I/O and no sampling and knows nothing of processes: loading lives in loader.py, the
vision tower in vision.py, placing images and choosing where the head runs in forward.py,
splitting across ranks in shard.py.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import ROLLBACK, KVCache, QuantizedKVCache, WindowCache
from .config import ModelConfig, TextConfig
from .norm import RMSNorm
from .vision import Projector, VisionTower


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, is_local: bool):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        # Scale is query_pre_attn_scalar ** -0.5 (168 for 27B), not head_dim ** -0.5.
        self.scale = cfg.query_pre_attn_scalar**-0.5
        rope = cfg.rope_local if is_local else cfg.rope_global
        self.rope_base, self.rope_scale = rope.rope_theta, 1.0 / rope.factor

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # QK-norm over head_dim, after projection and before RoPE. (B, heads, L, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.rope_offset if cache is not None else 0  # an int, or one per row
        # Linear RoPE scaling divides positions by the factor: mx.fast.rope multiplies by scale.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(cache, QuantizedKVCache):
            out = quantized_attention(q, k, v, self.scale, mask, cache)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def quantized_attention(q, keys, values, scale, mask, cache: QuantizedKVCache) -> mx.array:
    """Attention over a quantized cache with quantized matmuls: no float copy of the cache.

    q: (B, n_heads, L, D); keys/values: (packed, scales, biases), each (B, n_kv_heads, T, ...).
    """
    B, H, L, D = q.shape
    Hkv = keys[0].shape[1]
    q = (q * scale).reshape(B, Hkv, H // Hkv, L, D)  # grouped-query: heads sharing a kv head
    k = tuple(a[:, :, None] for a in keys)
    v = tuple(a[:, :, None] for a in values)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=cache.group_size, bits=cache.key_bits)
    if mask is not None:  # (B, 1, L, T) -> (B, 1, 1, L, T) over (B, Hkv, groups, L, T)
        scores = mx.where(mask[:, :, None], scores, mx.array(-mx.inf, scores.dtype))
    probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)  # softmax in float32
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=cache.group_size, bits=cache.value_bits)
    return out.reshape(B, H, L, -1)


class MLP(nn.Module):
    def __init__(self, D: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, hidden, bias=False)
        self.up_proj = nn.Linear(D, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, D, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, is_local: bool):
        super().__init__()
        self.is_local = is_local
        self.self_attn = Attention(cfg, is_local)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache) -> mx.array:
        # Post norms apply to the sublayer output before the residual add.
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, local) for local in cfg.is_local]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        h = self.embed_tokens(input_ids)
        # Scaled by sqrt(hidden), rounded to the compute dtype first as the reference does.
        return h * mx.array(math.sqrt(self.config.hidden_size), dtype=h.dtype)

    def own_layers(self) -> list:
        """The layers this process runs: all, or a pipeline stage's (the others are empty placeholders,
        so parameter names keep the checkpoint's layer numbers)."""
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def __call__(self, h: mx.array, cache: list, image_spans=None, norm: bool = True) -> mx.array:
        """`norm`: apply the final norm (not on a pipeline stage that passes its output on)."""
        L = h.shape[1]
        masks = {}
        for layer, c in zip(self.own_layers(), cache):
            if layer.is_local not in masks:
                # Every layer of one kind has the same cache geometry, so one mask per kind.
                masks[layer.is_local] = with_image_blocks(c.make_mask(L), image_spans, L)
            h = layer(h, masks[layer.is_local], c)
        return self.norm(h) if norm else h


def image_spans_of(ids, image_token: int) -> list[tuple[int, int]]:
    """[start, end) of each image in `ids` (host ints): each maximal run of soft tokens is one image.
    The one place image blocks are found; callers compute them once per prompt, never per step."""
    spans, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_token and start is None:
            start = i
        elif t != image_token and start is not None:
            spans.append((start, i))
            start = None
    return spans


def with_image_blocks(mask: mx.array | None, spans, L: int) -> mx.array | None:
    """Let soft tokens of one image also see the later tokens of the same image.

    Only future keys are added (kv > q); the causal and window rules already decide every
    earlier key, as in the reference. The chunk's own keys are the last L of the keys.
    `spans`: [start, end) of each image within this chunk (one row)."""
    if not spans or mask is None:  # no mask: a single query, which has no future keys
        return mask
    block = mx.full((L,), -1)
    for n, (a, b) in enumerate(spans):
        block[a:b] = n
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    future = mx.arange(L)[None, :] > mx.arange(L)[:, None]
    n_keys = mask.shape[-1]
    return mx.concatenate([mask[..., : n_keys - L], mask[..., n_keys - L :] | (same & future)], axis=-1)


class Model(nn.Module):
    """Gemma 3 causal LM: `model(input_ids, cache) -> logits` (B, L, vocab), for text.

    Its parts, for callers that need more than that (forward.py composes them): `embed(ids)` the token
    embeddings, `blocks(h, cache, image_spans)` the decoder layers and final norm, `head(h)` the tied
    output head on whichever positions the caller chooses."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text)
        if config.vision is not None:
            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = Projector(config)

    def __call__(self, input_ids: mx.array, cache: list | None = None) -> mx.array:
        """(B, L) token ids run on top of `cache` (one per layer, from `make_cache`; a fresh one when None,
        which is a sequence of its own) -> logits (B, L, vocab). Images: forward.logits."""
        if cache is None:
            cache = self.make_cache()
        return self.head(self.blocks(self.embed(input_ids), cache))

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings (B, L, hidden), scaled. An image's soft tokens get row 0 here (the soft token may
        lie past the table); forward.place_images puts the image features in their place."""
        image_token = self.config.image_token_index
        if self.config.vision is not None and image_token >= self.config.text.vocab_size:
            input_ids = mx.where(input_ids == image_token, 0, input_ids)
        return self.model.embed(input_ids)

    def blocks(self, h: mx.array, cache: list, image_spans=None, norm: bool = True) -> mx.array:
        """The decoder layers over embeddings `h` (B, L, hidden) -> final-norm hidden states. `image_spans`:
        [start, end) of each image in this chunk (its soft tokens also see each other); `norm`: apply the
        final norm (not on a pipeline stage that passes its output on)."""
        return self.model(h, cache, image_spans, norm)

    def head(self, h: mx.array) -> mx.array:
        # The output head is tied to the embedding matrix.
        return self.model.embed_tokens.as_linear(h)

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = 64, value_bits: int | None = None,
                   max_context: int | None = None, rollback: int = ROLLBACK) -> list:
        """One cache per layer: a window ring for local layers (able to take back `rollback` tokens);
        for global layers a full cache, quantized to `kv_bits` (keys) / `value_bits` (values, default
        kv_bits) when asked."""
        t = self.config.text

        def global_cache():
            if kv_bits is None:
                return KVCache(max_context)
            return QuantizedKVCache(kv_bits, value_bits or kv_bits, kv_group_size, max_context)

        # This rank's layers only, once split by shard.pipeline().
        return [WindowCache(t.sliding_window, rollback) if layer.is_local else global_cache() for layer in self.model.own_layers()]
