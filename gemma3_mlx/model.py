"""The Gemma 3 decoder in MLX: `model(input_ids, cache=...) -> logits`.

Five local (sliding-window) layers for every global one, QK-norm, `(1 + w)` RMSNorms, two
RoPE bases, tied output head. Sizes come from the config alone (270M to 27B). This module
does no I/O and no sampling; loading lives in loader.py, the vision tower in vision.py.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import ROLLBACK, KVCache, QuantizedKVCache, WindowCache
from .config import ModelConfig, TextConfig
from .norm import RMSNorm
from .shard import agree, check_tensor, pipeline, shard_tensor
from .vision import Projector, VisionTower, encode_images


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
    """Gemma 3 causal LM. `logits`: "all" positions, the "last" only (generation), "none", or
    "hidden" (the final hidden states; `head(h)` turns chosen positions into logits)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.group = None  # the distributed group after shard() or pipeline()
        self.stage = None  # this rank's pipeline stage (shard.Stage) after pipeline()
        self.model = TextModel(config.text)
        if config.vision is not None:
            self.vision_tower = VisionTower(config.vision)
            self.multi_modal_projector = Projector(config)

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) preprocessed images -> (N, mm_tokens_per_image, hidden) soft-token embeddings."""
        if self.config.vision is None:
            raise ValueError("this model has no vision tower (a text-only Gemma 3)")
        if self.group is None:
            return encode_images(self.vision_tower, self.multi_modal_projector, pixel_values)
        # Split across ranks: one rank holds the tower (rank 0, or the first pipeline stage).
        shape = (pixel_values.shape[0], self.config.mm_tokens_per_image, self.config.text.hidden_size)
        if "vision_tower" in self:
            feats = encode_images(self.vision_tower, self.multi_modal_projector, pixel_values).astype(mx.float32)
        else:
            feats = mx.zeros(shape, mx.float32)
        if self.stage is not None:
            return feats  # only the first stage embeds: the others never read these
        return mx.distributed.all_sum(feats, group=self.group)  # tensor parallel: rank 0's, exactly, everywhere

    def embed(self, input_ids: mx.array, image_features: mx.array | None, spans=None) -> mx.array:
        image_token = self.config.image_token_index
        ids = input_ids
        if self.config.vision is not None and image_token >= self.config.text.vocab_size:
            ids = mx.where(ids == image_token, 0, ids)  # the soft token may lie past the table
        h = self.model.embed(ids)
        if image_features is None:
            return h
        # Soft tokens take the projected image features, in order, not scaled by sqrt(hidden).
        feats = image_features.reshape(-1, h.shape[-1])
        n = sum(b - a for a, b in spans or ())
        if input_ids.shape[0] != 1 or n != feats.shape[0]:
            raise ValueError(f"{n} image tokens in the prompt but {feats.shape[0]} image features (batch 1)")
        pos = mx.concatenate([mx.arange(a, b) for a, b in spans])
        h[0, pos] = feats.astype(h.dtype)
        return h

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

        # This rank's layers only, once split by pipeline().
        return [WindowCache(t.sliding_window, rollback) if layer.is_local else global_cache() for layer in self.model.own_layers()]

    def __call__(self, input_ids: mx.array, cache: list | None = None, *, pixel_values: mx.array | None = None,
                 image_features: mx.array | None = None, image_spans=None, logits: str = "all") -> mx.array | None:
        """input_ids: (B, L), with each image already expanded to its soft tokens; pixel_values:
        (N, H, W, 3) for the N images in order (or their `image_features` from `encode_images`);
        `image_spans`: [start, end) of each image in this chunk, when the caller knows them (found
        from the ids otherwise, which reads them back from the device). An image block must not be
        split across calls (prompt_cache.py keeps them whole)."""
        if cache is None:
            cache = self.make_cache()
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if image_spans is None and image_features is not None:
            image_spans = image_spans_of(input_ids[0].tolist(), self.config.image_token_index)
        stage = self.stage
        if stage is None or stage.first:
            h = self.embed(input_ids, image_features, image_spans)
        else:  # a later pipeline stage: the previous stage's output, (B, L, hidden)
            h = stage.receive((*input_ids.shape, self.config.text.hidden_size), self.model.norm.weight.dtype)
        h = self.model(h, cache, image_spans, norm=stage is None or stage.last)
        if stage is not None and not stage.last:
            stage.pass_on(h)
            if logits == "none":
                return None
            # Only rank 0 has logits; these stand in (never computed): every rank goes on with agree()'s tokens.
            B, L = input_ids.shape
            width = self.config.text.hidden_size if logits == "hidden" else self.config.text.vocab_size
            return mx.broadcast_to(mx.zeros((1, 1, 1), h.dtype), (B, 1 if logits == "last" else L, width))
        if logits == "none":
            return None
        if logits == "hidden":  # final-norm hidden states (B, L, D): apply `head` where needed
            return h
        if logits == "last":
            h = h[:, -1:, :]
        return self.head(h)

    def head(self, h: mx.array) -> mx.array:
        # The output head is tied to the embedding matrix.
        return self.model.embed_tokens.as_linear(h)

    # ------------------------------------------------------------------ across several processes (shard.py)

    def shard(self, group: mx.distributed.Group) -> "Model":
        """Tensor parallel over `group`, in place: each rank keeps 1/N of the heads, of the MLP and of the
        vocabulary; rank 0 alone keeps the vision tower (images are encoded there and broadcast)."""
        groups = {m.group_size for layer in self.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
                  if hasattr(m, "group_size")}
        check_tensor(self.config.text, group.size(), groups)
        shard_tensor(self, group)
        if group.rank() != 0 and "vision_tower" in self:
            del self.vision_tower, self.multi_modal_projector
        self.group = group
        return self

    def pipeline(self, group: mx.distributed.Group, weights=None) -> "Model":
        """Pipeline parallel over `group`, in place: this rank keeps its run of layers, in proportion to
        `weights` (one per rank, e.g. each one's memory; equal when None). Rank 0 has the last layers."""
        self.stage = pipeline(self, group, weights)
        self.group = group
        return self

    def agree(self, tokens: mx.array) -> mx.array:
        """The sampled tokens every rank continues with: rank 0's (the engine calls this once per step)."""
        return tokens if self.group is None else agree(tokens, self.group, computed=self.stage is None)
