"""The Gemma 3 image encoder in MLX: the SigLIP vision tower and the multimodal projector.

`encode_images(tower, projector, pixels)` turns normalized images (N, H, W, 3), channels last,
values in [-1, 1], into soft-token embeddings (N, mm_tokens_per_image, text_hidden) that
replace the image placeholder tokens' embeddings in the text model. Sizes come from the
config alone. This module does no I/O, no image preprocessing (resize, pan & scan) and no
merging into the text sequence or attention masking: those live elsewhere.

It computes in the dtype of the loaded weights: float32 by default (`sanitize_vision`
casts), bfloat16 when asked (`sanitize_vision(weights, dtype=mx.bfloat16)`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig, VisionConfig
from .norm import RMSNorm


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # A conv with kernel = stride = patch_size cuts the image into non-overlapping patches.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.image_size, self.side = cfg.image_size, cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side**2, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (N, H/p, W/p, D)
        N, gh, gw, D = x.shape
        if (gh, gw) != (self.side, self.side):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} pixels, got {pixels.shape[1:3]}")
        # Row-major patch order, as the reference's flatten of (N, D, gh, gw).
        return x.reshape(N, gh * gw, D) + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.scale = (D // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Non-causal: every patch sees every patch of its image. (B, heads, L, head_dim)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        # SigLIP for Gemma 3 uses gelu_pytorch_tanh, the tanh approximation.
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        # Pre-norm residual blocks (plain LayerNorm with bias, not Gemma's RMSNorm).
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTower(nn.Module):
    """SigLIP vision model without the pooling head: (N, H, W, 3) -> (N, num_patches, vision_hidden)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported vision hidden_act {cfg.hidden_act!r}")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


class Projector(nn.Module):
    """Average-pool the patch grid to mm_tokens_per_image, RMSNorm, project into the text hidden size."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        v = config.vision
        self.patches_per_side = v.image_size // v.patch_size  # 64 for 896 / 14
        self.tokens_per_side = math.isqrt(config.mm_tokens_per_image)  # 16 for 256 tokens
        if self.tokens_per_side**2 != config.mm_tokens_per_image or self.patches_per_side % self.tokens_per_side:
            raise ValueError(f"mm_tokens_per_image {config.mm_tokens_per_image} does not pool a "
                             f"{self.patches_per_side}x{self.patches_per_side} patch grid evenly")
        k = self.patches_per_side // self.tokens_per_side
        self.pool = nn.AvgPool2d(k, stride=k)
        # Applied as x @ W: stored (vision_hidden, text_hidden), not as a Linear's (out, in).
        self.mm_input_projection_weight = mx.zeros((v.hidden_size, config.text.hidden_size))
        # A Gemma (1 + w) RMSNorm, with the vision config's layer_norm_eps as the reference does.
        self.mm_soft_emb_norm = RMSNorm(v.hidden_size, v.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        N, L, D = x.shape
        P = self.patches_per_side
        x = self.pool(x.reshape(N, P, P, D))  # (N, T, T, D), T = tokens per side
        x = self.mm_soft_emb_norm(x.reshape(N, -1, D))
        return x @ self.mm_input_projection_weight  # (N, T*T, text_hidden)


def encode_images(tower: VisionTower, projector: Projector, pixels: mx.array) -> mx.array:
    """(N, H, W, 3) normalized pixels -> (N, mm_tokens_per_image, text_hidden), in the tower's dtype."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    dtype = tower.embeddings.patch_embedding.weight.dtype
    return projector(tower(pixels.astype(dtype)))


def vision_name(key: str) -> str | None:
    """This module's name for a checkpoint key of the tower or projector; None for any other key."""
    # transformers 4.52+ / 5 in-memory names carry Gemma3Model's `model.` prefix.
    name = key.removeprefix("model.")
    # Hub checkpoints (transformers 4) nest SigLIP one level deeper; transformers 5 saves without it.
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    if name.startswith("vision_tower.head."):
        return None  # SigLIP's pooling head (vision_use_head: true): Gemma 3 uses every patch, never the pooled one
    return name if name.startswith(("vision_tower.", "multi_modal_projector.")) else None


def sanitize_vision(weights: dict[str, mx.array], dtype: mx.Dtype | None = mx.float32) -> dict[str, mx.array]:
    """Checkpoint weights -> this module's names (`vision_tower.*`, `multi_modal_projector.*`).

    Keys of the text model are left out (loader.sanitize handles them). Floating weights are
    cast to `dtype` (float32 by default: the tower is small next to the text model); None keeps
    the checkpoint's dtype. Pure, and applying it twice gives the same result.
    """
    out = {}
    for key, w in weights.items():
        name = vision_name(key)
        if name is None:
            continue
        if name.endswith("patch_embedding.weight") and w.ndim == 4 and w.shape[2] == w.shape[3] != w.shape[1]:
            # PyTorch conv (out, in, kh, kw) -> MLX (out, kh, kw, in); MLX-layout weights pass unchanged.
            w = w.transpose(0, 2, 3, 1)
        if dtype is not None and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        out[name] = w
    return out
