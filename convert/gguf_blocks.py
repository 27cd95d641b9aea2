"""Carry GGUF quantized blocks over to MLX affine quantization without requantizing.

MLX stores `value = scale * q + bias` per group of `group_size` values, with the unsigned q
packed into uint32 words. The GGML block types below decode to exactly that form with groups
of 32 (K-quants through their 32-value sub-blocks), so `to_mlx_affine` only rewrites the
fields: the dequantized values are the ones the gguf package computes, bit for bit up to
float32 rounding. Everything is vectorized numpy over whole tensors.

It deliberately does not handle Q6_K, Q3_K, Q2_K (sub-blocks of 16: MLX groups cannot express
them), the IQ/TQ types, or float tensors, and it never requantizes: callers dequantize those
with `gguf.quants.dequantize` and choose what to do. It assumes a little-endian host, like
GGUF files and MLX's packing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..packing import pack

GROUP_SIZE = 32

# GGML types that map exactly onto MLX groups of 32 -> MLX bits.
MLX_EXACT = {
    T.Q8_0: 8,
    T.Q4_0: 4,
    T.Q4_1: 4,
    T.Q5_0: 5,
    T.Q5_1: 5,
    T.Q4_K: 4,
    T.Q5_K: 5,
}


def to_mlx_affine(
    data: np.ndarray, qtype: T, shape: tuple[int, int]
) -> tuple[mx.array, mx.array, mx.array, int, int]:
    """GGUF block bytes -> (packed uint32 weight, float32 scales, float32 biases, bits, group_size).

    `data` is the tensor's raw bytes as the gguf reader gives them, (rows, bytes_per_row) uint8;
    `shape` is the logical (rows, cols), i.e. the reversed GGUF dims. The result feeds
    `mx.dequantize` / `mx.quantized_matmul` with mode "affine", group_size 32 and `bits`.
    """
    qtype = T(qtype)
    if qtype not in MLX_EXACT:
        raise ValueError(f"{qtype.name} has no exact MLX affine form (supported: {[t.name for t in MLX_EXACT]})")
    rows, cols = (int(n) for n in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise ValueError(f"{qtype.name}: {cols} columns are not a whole number of {block_size}-value blocks")
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.size != rows * (cols // block_size) * type_size:
        raise ValueError(f"{qtype.name}: {raw.size} bytes do not hold a {rows}x{cols} tensor")
    blocks = raw.reshape(rows, cols // block_size, type_size)

    q, scales, biases = _DECODERS[qtype](blocks)
    bits = MLX_EXACT[qtype]
    packed = pack(q.reshape(rows, cols), bits)
    scales = scales.reshape(rows, cols // GROUP_SIZE).astype(np.float32)
    biases = biases.reshape(rows, cols // GROUP_SIZE).astype(np.float32)
    return mx.array(packed), mx.array(scales), mx.array(biases), bits, GROUP_SIZE


# ---- GGML block fields -------------------------------------------------------------------------
# Each decoder maps blocks (rows, n_blocks, type_size) uint8 to unsigned q (rows, n_blocks, values)
# uint8 and float32 scales / biases, one per 32 values: (rows, n_blocks, values // 32).


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte offset `at` of every block, as float32 (rows, n_blocks, 1)."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view("<f2").astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32): values 0-15 are the low nibbles, 16-31 the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32) with bit j as value j's 5th bit."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def _q8_0(b):
    # value = d * q, q int8. Flipping the sign bit turns int8 q into the uint8 q + 128.
    d = _f16(b, 0)
    return b[..., 2:] ^ np.uint8(0x80), d, -128 * d


def _q4_0(b):
    d = _f16(b, 0)  # value = d * (q - 8)
    return _nibbles32(b[..., 2:]), d, -8 * d


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)  # value = d * q + m
    return _nibbles32(b[..., 4:]), d, m


def _q5_0(b):
    d = _f16(b, 0)  # value = d * (q - 16); 4 bytes of 5th bits, then 16 bytes of nibbles
    return _nibbles32(b[..., 6:]) | _high_bits32(b[..., 2:6]), d, -16 * d


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)  # value = d * q + m
    return _nibbles32(b[..., 8:]) | _high_bits32(b[..., 4:8]), d, m


def _k_scales(b):
    """Super-block d, dmin and the 12 bytes of 6-bit (scale, min) pairs -> MLX scales, biases.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; sub-blocks 4-7 take
    their low 4 bits from the nibbles of bytes 8-11 and their top 2 from bits 6-7 of bytes 0-7.
    """
    d, dmin, s = _f16(b, 0), _f16(b, 2), b[..., 4:16]
    lo, hi, extra = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 6) << 4)], axis=-1)
    # value = d * sc * q - dmin * m per 32-value sub-block; both products are exact in float32.
    return d * sc.astype(np.float32), -dmin * mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, n, 128) bytes -> (rows, n, 256): each 32-byte chunk c holds sub-block 2c in its
    low nibbles and sub-block 2c + 1 in its high nibbles."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-3], 256)


def _q4_k(b):
    scales, biases = _k_scales(b)  # 2 + 2 + 12 bytes, then 128 bytes of nibbles
    return _k_nibbles(b[..., 16:]), scales, biases


def _q5_k(b):
    scales, biases = _k_scales(b)  # 2 + 2 + 12 bytes, 32 bytes of 5th bits, 128 of nibbles
    # Bit i of qh[l] is the 5th bit of value l in sub-block i: (rows, n, 8, 32).
    qh = (b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1
    qh = np.swapaxes(qh, -1, -2).reshape(*b.shape[:-1], 256)
    return _k_nibbles(b[..., 48:]) | (qh << 4), scales, biases


_DECODERS = {
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
}
