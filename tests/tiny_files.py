"""Tiny but complete Gemma 3 files for the bad-file tests: a GGUF and a safetensors model directory.

Both hold a real 2-layer model (one local, one global layer) with a 320-piece SentencePiece
vocabulary, so `gemma3 convert` and `gemma3 generate -m` run all the way through on them. The
GGUF (~70 KB) mixes the block types a real one has (Q8_0, Q5_0, Q4_0, Q4_1, Q5_1, Q4_K, Q6_K,
F16, F32); the directory (~190 KB) is a Hugging Face style bf16 checkpoint with tokenizer.model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

T = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 2, 1, 32, 2, 320
GGUF_FFN, DIR_FFN = 256, 128  # K-quant blocks need rows of 256 values
FILLER = 0x4E00  # the vocabulary is filled up with CJK characters from here

# Pieces: Gemma's special ids, 256 byte-fallback pieces, letters, a few words, then CJK characters.
_WORDS = ["\u2581the", "\u2581a", "\u2581cat", "\u2581sat", "\u2581on", "\u2581mat", "\u2581hello", "\u2581world",
          "ing", "ed", "er", "\u2581is", "\u2581of", "\u2581and", "\u2581to", "\u2581in"]


def vocabulary(n: int = VOCAB) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, SentencePiece types) of the tiny tokenizer, n entries (VOCAB for the model's own)."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces, types = list(special), [3] * len(special)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + _WORDS
    normal += [chr(FILLER + i) for i in range(n - len(pieces) - len(normal))]  # single characters: any id is reachable
    pieces += normal
    types += [1] * len(normal)
    scores = [0.0] * len(special) + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    assert len(pieces) == n
    return pieces, scores, types


def _k_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks with small, finite scales (gguf 0.19 cannot quantize K-quants)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == T.Q4_K:  # d, dmin at bytes 0-3
        raw[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    else:  # Q6_K: d at bytes 208-209
        raw[..., 208:210] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, seed: int = 0, meta: dict | None = None, types: dict | None = None,
               vocab: int = VOCAB, arch: str = "gemma3") -> Path:
    """The tiny GGUF. `meta`: metadata to change ({key: value}, None to leave a key out), `types`:
    block types by tensor name (raw random blocks for those gguf cannot quantize), `vocab`: tokens."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    V = gguf.GGUFValueType
    pieces, scores, token_types = vocabulary(vocab)
    kv = {
        "general.name": ("tiny-gemma-3-it", V.STRING), "gemma3.block_count": (LAYERS, V.UINT32),
        "gemma3.embedding_length": (HIDDEN, V.UINT32), "gemma3.feed_forward_length": (GGUF_FFN, V.UINT32),
        "gemma3.attention.head_count": (HEADS, V.UINT32), "gemma3.attention.head_count_kv": (KV_HEADS, V.UINT32),
        "gemma3.attention.key_length": (HEAD_DIM, V.UINT32), "gemma3.attention.value_length": (HEAD_DIM, V.UINT32),
        "gemma3.context_length": (256, V.UINT32), "gemma3.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32),
        "gemma3.rope.freq_base": (1e6, V.FLOAT32), "gemma3.attention.sliding_window": (8, V.UINT32),
        "gemma3.attention.sliding_window_pattern": (2, V.UINT32), "tokenizer.ggml.model": ("llama", V.STRING),
        "tokenizer.ggml.tokens": (pieces, V.ARRAY), "tokenizer.ggml.scores": (scores, V.ARRAY),
        "tokenizer.ggml.token_type": (token_types, V.ARRAY), "tokenizer.ggml.bos_token_id": (2, V.UINT32),
        "tokenizer.ggml.eos_token_id": (1, V.UINT32), "tokenizer.ggml.unknown_token_id": (3, V.UINT32),
        "tokenizer.ggml.padding_token_id": (0, V.UINT32),
    }
    for key, value in (meta or {}).items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = (value, V.STRING if isinstance(value, str) else V.FLOAT32 if isinstance(value, float)
                       else V.ARRAY if isinstance(value, list) else V.UINT32 if value < 1 << 32 else V.UINT64)
    for key, (value, vtype) in kv.items():
        if vtype == V.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    types = types or {}

    def mat(name, rows, cols, qtype):
        qtype = types.get(name, qtype)
        x = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
        if qtype in (T.Q4_K, T.Q6_K):
            w.add_tensor(name, _k_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
        elif qtype not in (T.F16, T.F32, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # IQ2_XXS, TQ1_0, I8, F64...
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    def norm(name, n):  # llama.cpp stores Gemma norms as 1 + w
        if name in types:
            return mat(name, 1, n, types[name])
        w.add_tensor(name, (1.0 + rng.normal(0, 0.05, n)).astype(np.float32))

    mat("token_embd.weight", VOCAB, HIDDEN, T.Q8_0)
    for i in range(LAYERS):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", HIDDEN)
        mat(b + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN, T.Q5_0)
        mat(b + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, T.Q4_0)
        mat(b + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, T.Q8_0)
        norm(b + "attn_q_norm.weight", HEAD_DIM)
        norm(b + "attn_k_norm.weight", HEAD_DIM)
        mat(b + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM, T.Q4_1)
        norm(b + "post_attention_norm.weight", HIDDEN)
        norm(b + "ffn_norm.weight", HIDDEN)
        mat(b + "ffn_gate.weight", GGUF_FFN, HIDDEN, T.Q5_1)
        mat(b + "ffn_up.weight", GGUF_FFN, HIDDEN, T.F16)
        mat(b + "ffn_down.weight", HIDDEN, GGUF_FFN, T.Q4_K if i == 0 else T.Q6_K)
        norm(b + "post_ffw_norm.weight", HIDDEN)
    norm("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dir_config() -> dict:
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": DIR_FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 8, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        "_name_or_path": "tiny-gemma-3-it",
    }


def write_dir(path: Path, tokenizer_model: bytes, seed: int = 0) -> Path:
    """A Hugging Face style checkpoint directory (bf16 safetensors, config.json, tokenizer.model)."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "pre_feedforward_layernorm.weight": (HIDDEN,), p + "post_feedforward_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (DIR_FFN, HIDDEN), p + "mlp.up_proj.weight": (DIR_FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, DIR_FFN),
        })
    weights = {k: mx.array(rng.normal(0, 0.05, s).astype(np.float32)).astype(mx.bfloat16) for k, s in shapes.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(dir_config(), indent=2))
    (path / "tokenizer.model").write_bytes(tokenizer_model)
    return path
