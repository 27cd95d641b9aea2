"""Rebuild a SentencePiece `tokenizer.model` from the tokenizer metadata of a GGUF file.

A GGUF keeps the vocabulary as three arrays (`tokenizer.ggml.tokens/scores/token_type`) but not
the normalizer or trainer settings, so we supply Gemma's: BPE, byte fallback, split digits,
identity normalizer, no dummy prefix, whitespace kept as is. The ModelProto is written with a
tiny hand-rolled protobuf encoder (three wire types), so there is no protobuf dependency.
Every array is checked (types, one entry per token, special ids inside the vocabulary) before
it is used. Deliberately not handled: non-SentencePiece GGUF tokenizers (GPT-2 byte-level BPE and friends).
"""

import numpy as np

from .gguf_file import STRING, Array, GGUFFile

# SentencePiece piece types (sentencepiece_model.proto); GGUF uses the same numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
BPE = 2  # TrainerSpec.ModelType

# Gemma's special ids; `tokenizer.ggml.*_token_id` override them when present.
DEFAULT_IDS = {"unk": 3, "bos": 2, "eos": 1, "pad": 0}


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(field: int, value: int) -> bytes:  # wire type 0: int32, bool, enum
    return _varint(field << 3) + _varint(int(value))


def _bytes(field: int, value: bytes | str) -> bytes:  # wire type 2: string, bytes, sub-message
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _varint(field << 3 | 2) + _varint(len(value)) + value




MAX_TOKENS = 1 << 22


def _array(f: GGUFFile, key: str, n: int | None, numeric: bool) -> Array | None:
    a = f.fields.get(key)
    if a is None:
        return None
    if not isinstance(a, Array) or (a.item_type == STRING) == numeric or (numeric and a.item_type == 7):
        raise ValueError(f"{key} must be an array of {'numbers' if numeric else 'strings'}")
    if n is not None and a.count != n:
        raise ValueError(f"{key} has {a.count:,} entries for {n:,} tokens")
    return a


def _special_id(f: GGUFFile, key: str, default: int, n: int) -> int:
    v = f.fields.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ValueError(f"{key} is {v!r}, not a token id below {n:,}")
    return v


def sentencepiece_model_from_gguf(f: GGUFFile) -> bytes:
    """A serialized SentencePiece ModelProto equivalent to the GGUF's tokenizer."""
    if "tokenizer.ggml.tokens" not in f.fields or "tokenizer.ggml.model" not in f.fields:
        raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.tokens / tokenizer.ggml.model)")
    model = f.fields["tokenizer.ggml.model"]
    if model != "llama":
        raise ValueError(f"GGUF tokenizer is {model!r}, not a SentencePiece ('llama') tokenizer"[:200])
    token_array = _array(f, "tokenizer.ggml.tokens", None, numeric=False)
    n = token_array.count
    if not 1 <= n <= MAX_TOKENS:
        raise ValueError(f"tokenizer.ggml.tokens has {n:,} entries (1 to {MAX_TOKENS:,})")
    tokens = f.strings(token_array)
    scores = _array(f, "tokenizer.ggml.scores", n, numeric=True)
    scores = f.numbers(scores).astype(np.float32) if scores is not None else np.zeros(n, np.float32)
    types = _array(f, "tokenizer.ggml.token_type", n, numeric=True)
    types = f.numbers(types) if types is not None else np.full(n, NORMAL)
    if types.dtype.kind not in "iu" or not np.isin(types, (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, 5, BYTE)).all():
        raise ValueError("tokenizer.ggml.token_type holds values that are not SentencePiece piece types")
    ids = {
        name: _special_id(f, f"tokenizer.ggml.{key}_token_id", DEFAULT_IDS[name], n)
        for name, key in [("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")]
    }

    # Each piece is a SentencePiece message {1: piece, 2: score (fixed32, wire type 5), 3: type}, written
    # out inline (tags 0x0a, 0x15, 0x18): this loop runs once per token, 262,144 times for Gemma.
    packed, space, pieces = scores.astype("<f4").tobytes(), "\u2581".encode("utf-8"), bytearray()
    for i, (piece, kind) in enumerate(zip(tokens, types.tolist())):
        if kind == USER_DEFINED:
            # llama.cpp's converter writes the whitespace pieces ("  ") with real spaces; SentencePiece
            # matches user-defined pieces after escaping spaces, so they must be spelled with U+2581.
            piece = piece.replace(b" ", space)
        if i == ids["unk"]:
            kind = UNKNOWN  # Gemma GGUFs type <unk> as control; SentencePiece needs exactly one UNKNOWN
        body = b"\x0a" + _varint(len(piece)) + piece + b"\x15" + packed[4 * i:4 * i + 4] + b"\x18" + _varint(kind)
        pieces += b"\x0a" + _varint(len(body)) + body

    trainer = b"".join([
        _int(3, BPE),
        _int(4, n),  # vocab_size
        _int(20, 16),  # max_sentencepiece_length
        _int(21, True),  # split_by_unicode_script
        _int(23, True),  # split_by_number
        _int(22, True),  # split_by_whitespace
        _int(24, False),  # treat_whitespace_as_suffix
        _int(26, True),  # allow_whitespace_only_pieces
        _int(25, True),  # split_digits
        _int(35, True),  # byte_fallback
        _int(32, True),  # vocabulary_output_piece_score
        _int(33, True),  # hard_vocab_limit
        _int(40, ids["unk"]),
        _int(41, ids["bos"]),
        _int(42, ids["eos"]),
        _int(43, ids["pad"]),
        _bytes(45, tokens[ids["unk"]]),  # unk_piece
        _bytes(46, tokens[ids["bos"]]),  # bos_piece
        _bytes(47, tokens[ids["eos"]]),  # eos_piece
        _bytes(48, tokens[ids["pad"]]),  # pad_piece
    ])
    normalizer = b"".join([
        _bytes(1, "identity"),  # name; no precompiled_charsmap, so no NFKC
        _int(3, False),  # add_dummy_prefix
        _int(4, False),  # remove_extra_whitespaces
        _int(5, True),  # escape_whitespaces: " " -> U+2581
    ])
    return bytes(pieces) + _bytes(2, trainer) + _bytes(3, normalizer)
