"""MLX's bit layout for quantized weights: `pack` / `unpack` between unsigned ints and uint32 words.

The loader unpacks (a fast CPU dequantize for 3/5/6 bits); the converter packs (quantize.py,
GGUF block conversion). Pure numpy: it does not choose scales or biases, or quantize anything.
"""

from __future__ import annotations

import numpy as np


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., cols) unsigned ints in [0, 2**bits) -> (..., cols * bits / 32) uint32 in MLX's layout.

    MLX reads each row as one little-endian bit stream: value i occupies bits
    [i * bits, (i + 1) * bits) of the row's bytes. For 4 and 8 bits that is value i in
    word i * bits // 32 at shift (i * bits) % 32; 3-, 5- and 6-bit values straddle words.
    """
    *lead, cols = q.shape
    if bits not in range(1, 9) or (cols * bits) % 32:
        raise ValueError(f"cannot pack {cols} values of {bits} bits into whole uint32 words")
    q = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, cols)
    rows = q.shape[0]
    if bits == 8:
        return q.view("<u4").reshape(*lead, cols // 4)
    # 8 values of `bits` bits fill exactly `bits` bytes: build them in a uint64, keep the low bytes.
    q8 = q.reshape(rows, cols // 8, 8)
    word = np.zeros((rows, cols // 8), dtype=np.uint64)
    for k in range(8):  # loops over positions within 8 values, never over blocks
        word |= q8[..., k].astype(np.uint64) << np.uint64(k * bits)
    stream = word.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view("<u4").reshape(*lead, -1)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: (..., words) uint32 -> (..., words * 32 / bits) uint8."""
    w = np.ascontiguousarray(w, dtype="<u4")
    *lead, words = w.shape
    cols = words * 32 // bits
    stream = w.reshape(-1, words).view(np.uint8)
    if bits == 8:
        return stream.reshape(*lead, cols)
    word = np.zeros((stream.shape[0], cols // 8, 8), dtype=np.uint8)
    word[..., :bits] = stream.reshape(-1, cols // 8, bits)
    word = word.view("<u8")  # (rows, cols // 8, 1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    q = (word >> shifts) & np.uint64(2**bits - 1)
    return q.astype(np.uint8).reshape(*lead, cols)
