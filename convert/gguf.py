"""Read a Gemma 3 GGUF file: config, tensors under MLX names, and the SentencePiece tokenizer.

The `gguf` package dequantizes every block type to numpy (MLX's own GGUF loader fails on
K-quants); blocks that MLX can express exactly are carried over at their own bits instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf.quants import dequantize

from ..config import GLOBAL, LOCAL, ModelConfig, instruction_tuned_from_name
from ..errors import ConversionError
from .gguf_blocks import MLX_EXACT, to_mlx_affine
from .gguf_tokenizer import sentencepiece_model_from_gguf
from .tensors import FloatTensor, QuantizedTensor

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


class GGUFSource:
    """An opened, validated Gemma 3 GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises assorted errors on bad files
            raise ConversionError(f"{self.path.name}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = self.field("general.architecture")
        if arch != "gemma3":
            raise ConversionError(f"{self.path.name}: GGUF architecture is {arch!r}, not Gemma 3 ('gemma3')")
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ConversionError(f"{self.path.name}: tensor data is cut short (the file is truncated)")

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> ModelConfig:
        a = "gemma3."
        n_layers = int(self.field(a + "block_count"))
        hidden = int(self.field(a + "embedding_length"))
        heads = int(self.field(a + "attention.head_count"))
        head_dim = int(self.field(a + "attention.key_length", hidden // heads))
        embd = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
        pattern = int(self.field(a + "attention.sliding_window_pattern", 6))
        rope_factor = float(self.field(a + "rope.scaling.factor", 1.0) or 1.0)
        glob = {"rope_type": "default", "rope_theta": float(self.field(a + "rope.freq_base", 1e6))}
        if rope_factor != 1.0:
            glob = {**glob, "rope_type": "linear", "factor": rope_factor}
        d = {
            "model_type": "gemma3_text",
            "hidden_size": hidden,
            "intermediate_size": int(self.field(a + "feed_forward_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field(a + "attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "vocab_size": int(embd.shape[1]),
            "rms_norm_eps": float(self.field(a + "attention.layer_norm_rms_epsilon", 1e-6)),
            # GGUF has no query_pre_attn_scalar: 27B (62 layers) uses hidden/heads, others head_dim.
            "query_pre_attn_scalar": hidden // heads if n_layers == 62 else head_dim,
            "sliding_window": int(self.field(a + "attention.sliding_window", 4096)),
            "max_position_embeddings": int(self.field(a + "context_length", 131072)),
            "layer_types": [GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n_layers)],
            # The local RoPE base is not stored in GGUF; Gemma 3 always uses 10,000.
            "rope_parameters": {LOCAL: {"rope_type": "default", "rope_theta": 10000.0}, GLOBAL: glob},
            "instruction_tuned": self.instruction_tuned(),
        }
        return ModelConfig.from_dict(d)

    def instruction_tuned(self) -> bool:
        """By its fine-tune tag or name (general.finetune "it", "gemma-3-1b-it"), else by its chat template."""
        for name in (self.field("general.finetune"), self.field("general.name"), self.path.stem):
            said = instruction_tuned_from_name(str(name), bare_gemma_is_base=False) if name else None
            if said is not None:
                return said
        return self.field("tokenizer.chat_template") is not None

    def tensor_count(self) -> int:
        return sum(mlx_name(t.name) is not None for t in self.reader.tensors)

    def tensors(self, native: bool = False) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        """(MLX name, tensor) in file order: float32 arrays, dequantized.

        With `native`, blocks that map exactly onto MLX groups of 32 come as `QuantizedTensor`s
        at their own bits instead (no dequantize/requantize round trip).
        """
        for t in self.reader.tensors:
            name = mlx_name(t.name)
            if name is None:
                continue
            shape = tuple(reversed([int(x) for x in t.shape]))  # GGUF lists dims innermost first
            if native and t.tensor_type in MLX_EXACT and len(shape) == 2:
                w, scales, biases, bits, group_size = to_mlx_affine(t.data, t.tensor_type, shape)
                yield name, QuantizedTensor(w, scales, biases, bits, group_size, f"{t.tensor_type.name} (exact)")
                continue
            w = self.float_tensor(t)
            yield name, (FloatTensor(w, t.tensor_type.name) if native else w)

    def float_tensor(self, t) -> np.ndarray:
        """One of `reader.tensors` dequantized to float32, in MLX's shape (random access: the quality check)."""
        shape = tuple(reversed([int(x) for x in t.shape]))
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if "norm" in t.name:
            w = w - 1.0  # llama.cpp stores Gemma norm weights with the +1 already added
        return w

    def tokenizer_model(self) -> bytes:
        try:
            return sentencepiece_model_from_gguf(self.reader)
        except ValueError as e:
            raise ConversionError(f"{self.path.name}: {e}") from None
