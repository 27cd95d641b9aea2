"""Read a Gemma 3 GGUF file: config, tensors under MLX names, and the SentencePiece tokenizer.

gguf_file.py reads the file with bounded work; here its fields become a checked ModelConfig
(each missing or impossible value named by its GGUF key) and its tensors MLX ones. The `gguf`
package dequantizes every supported block type to numpy (MLX's own GGUF loader fails on
K-quants); blocks that MLX can express exactly are carried over at their own bits instead.
Types we cannot dequantize (IQ*, TQ*, integer and F64 tensors) are refused when the file is opened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ..config import GLOBAL, LOCAL, ModelConfig, checked, instruction_tuned_from_name
from ..errors import ConfigError, ConversionError, ModelFileError
from ..tokenizer import check_tokenizer
from .gguf_blocks import MLX_EXACT, to_mlx_affine
from .gguf_file import Array, GGUFFile
from .gguf_tokenizer import sentencepiece_model_from_gguf
from .tensors import FloatTensor, QuantizedTensor

SUPPORTED = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)

# GGUF tensor name -> MLX parameter name (within model.layers.N where it has a block number).
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def mlx_name(gguf_name: str) -> str | None:
    """MLX parameter name for a GGUF tensor name; None for tensors the model does not use."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{suffix}"
    return None  # e.g. output.weight: the head is tied to the embedding in Gemma 3


_REQUIRED = object()


class GGUFSource:
    """An opened, validated Gemma 3 GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.name = self.path.name
        arch = self.field("general.architecture")
        if arch != "gemma3":
            raise ConversionError(f"{self.name}: GGUF architecture is {arch!r}, not Gemma 3 ('gemma3')"[:300])
        self.used = [t for t in self.file.tensors if mlx_name(t.name) is not None]
        for t in self.used:
            if t.type not in SUPPORTED:
                raise ConversionError(f"{self.name}: tensor {t.name} has block type {t.type.name}, which cannot be "
                                      f"converted (supported: {', '.join(q.name for q in SUPPORTED)})")
        self._config = self._read_config()

    def field(self, key: str, default=None):
        """A scalar or string metadata value (an array's values through self.file)."""
        return self.file.fields.get(key, default)

    def _number(self, key: str, default=_REQUIRED, name: str | None = None):
        """A numeric metadata value, checked as config field `name` (see config.LIMITS) under its GGUF key."""
        v = self.file.fields.get(key, default)
        if v is _REQUIRED:
            raise ConfigError(f"{self.name}: GGUF metadata has no {key}")
        if isinstance(v, (Array, str)):
            raise ConfigError(f"{self.name}: {key} must be a number, got {'an array' if isinstance(v, Array) else repr(v)}"[:300])
        if name is None:
            return v
        try:
            return checked(name, v, key)
        except ConfigError as e:
            raise ConfigError(f"{self.name}: {e}") from None

    def _read_config(self) -> ModelConfig:
        a = "gemma3."
        n_layers = self._number(a + "block_count", name="num_hidden_layers")
        hidden = self._number(a + "embedding_length", name="hidden_size")
        heads = self._number(a + "attention.head_count", name="num_attention_heads")
        head_dim = self._number(a + "attention.key_length", max(hidden // heads, 1), "head_dim")
        embd = next((t for t in self.file.tensors if t.name == "token_embd.weight"), None)
        if embd is None or len(embd.shape) != 2:
            raise ModelFileError(f"{self.name}: no 2-D token_embd.weight tensor (the embedding)")
        pattern = self._number(a + "attention.sliding_window_pattern", 6, "sliding_window_pattern")
        rope_factor = self._number(a + "rope.scaling.factor", 0.0) or 1.0
        glob = {"rope_type": "default", "rope_theta": self._number(a + "rope.freq_base", 1e6, "rope_theta")}
        if rope_factor != 1.0:
            glob = {**glob, "rope_type": "linear", "factor": self._number(a + "rope.scaling.factor", name="factor")}
        d = {
            "model_type": "gemma3_text",
            "hidden_size": hidden,
            "intermediate_size": self._number(a + "feed_forward_length", name="intermediate_size"),
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self._number(a + "attention.head_count_kv", heads, "num_key_value_heads"),
            "head_dim": head_dim,
            "vocab_size": self._number("token_embd.weight rows", embd.shape[1], "vocab_size"),
            "rms_norm_eps": self._number(a + "attention.layer_norm_rms_epsilon", 1e-6, "rms_norm_eps"),
            # GGUF has no query_pre_attn_scalar: 27B (62 layers) uses hidden/heads, others head_dim.
            "query_pre_attn_scalar": hidden // heads if n_layers == 62 else head_dim,
            "sliding_window": self._number(a + "attention.sliding_window", 4096, "sliding_window"),
            "max_position_embeddings": self._number(a + "context_length", 131072, "max_position_embeddings"),
            "layer_types": [GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n_layers)],
            # The local RoPE base is not stored in GGUF; Gemma 3 always uses 10,000.
            "rope_parameters": {LOCAL: {"rope_type": "default", "rope_theta": 10000.0}, GLOBAL: glob},
            "instruction_tuned": self.instruction_tuned(),
        }
        try:
            return ModelConfig.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{self.name}: {e}") from None

    def config(self) -> ModelConfig:
        return self._config

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """MLX name -> logical shape (outermost first) of every tensor the model uses."""
        return {mlx_name(t.name): tuple(reversed(t.shape)) for t in self.used}

    def instruction_tuned(self) -> bool:
        """By its fine-tune tag or name (general.finetune "it", "gemma-3-1b-it"), else by its chat template."""
        for name in (self.field("general.finetune"), self.field("general.name"), self.path.stem):
            said = instruction_tuned_from_name(name, bare_gemma_is_base=False) if isinstance(name, str) else None
            if said is not None:
                return said
        return self.field("tokenizer.chat_template") is not None

    def tensor_count(self) -> int:
        return len(self.used)

    def tensors(self, native: bool = False) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        """(MLX name, tensor) in file order: float32 arrays, dequantized.

        With `native`, blocks that map exactly onto MLX groups of 32 come as `QuantizedTensor`s
        at their own bits instead (no dequantize/requantize round trip).
        """
        for t in self.used:
            name, shape = mlx_name(t.name), tuple(reversed(t.shape))  # GGUF lists dims innermost first
            if native and t.type in MLX_EXACT and len(shape) == 2:
                w, scales, biases, bits, group_size = to_mlx_affine(self.file.data(t), t.type, shape)
                yield name, QuantizedTensor(w, scales, biases, bits, group_size, f"{t.type.name} (exact)")
                continue
            w = self.float_tensor(t)
            yield name, (FloatTensor(w, t.type.name) if native else w)

    def float_tensor(self, t) -> np.ndarray:
        """One of `used` dequantized to float32, in MLX's shape (random access: the quality check)."""
        w = dequantize(self.file.data(t), t.type).astype(np.float32, copy=False).reshape(tuple(reversed(t.shape)))
        if "norm" in t.name:
            w = w - 1.0  # llama.cpp stores Gemma norm weights with the +1 already added
        return w

    def tokenizer_model(self) -> bytes:
        """The rebuilt tokenizer.model, checked to load and to fit the embedding."""
        try:
            proto = sentencepiece_model_from_gguf(self.file)
        except ValueError as e:
            raise ModelFileError(f"{self.name}: {e}") from None
        check_tokenizer(proto, self._config.text.vocab_size, f"{self.name}: its tokenizer")
        return proto
