"""GGUF quantized blocks carried over to MLX affine quantization: lossless against gguf's own decoder."""

import mmap
import struct

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from gemma3_mlx.convert.gguf_blocks import GROUP_SIZE, MLX_EXACT, to_mlx_affine
from gemma3_mlx.packing import pack

T = gguf.GGMLQuantizationType
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf 0.19 cannot quantize K-quants
TWO_FP16 = {T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K}  # blocks opening with (d, m) or (d, dmin)
# Lossless: the MLX form holds the same field values; the bound only allows for float32
# rounding in a different order of operations (measured: 0.0 for every type on CPU).
REL_EXACT = 1e-6


def random_blocks(qtype, rows, cols, seed=0) -> np.ndarray:
    """Valid raw blocks: random bytes for the quantized ints, random finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    n = 2 if qtype in TWO_FP16 else 1
    f16 = rng.uniform(-0.1, 0.1, size=(rows, cols // block, n)).astype("<f2")
    raw[..., : 2 * n] = f16.view(np.uint8)
    return raw.reshape(rows, -1)


def check_lossless(data, qtype, shape):
    """Convert, then compare MLX's dequantize and quantized_matmul with gguf's float32 values."""
    w, scales, biases, bits, group = to_mlx_affine(data, qtype, shape)
    rows, cols = shape
    assert (bits, group) == (MLX_EXACT[qtype], GROUP_SIZE)
    assert w.dtype == mx.uint32 and w.shape == (rows, cols * bits // 32)
    assert scales.dtype == biases.dtype == mx.float32
    assert scales.shape == biases.shape == (rows, cols // GROUP_SIZE)

    ref = dequantize(data, qtype).reshape(shape)
    got = np.array(mx.dequantize(w, scales, biases, group_size=group, bits=bits))
    err = float(np.abs(got - ref).max())
    assert err <= REL_EXACT * np.abs(ref).max(), (qtype.name, err)

    x = np.random.default_rng(1).standard_normal((4, cols)).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), w, scales, biases, transpose=True, group_size=group, bits=bits))
    y_ref = x.astype(np.float64) @ ref.astype(np.float64).T  # (4, rows)
    assert np.abs(y - y_ref).max() <= 1e-4 * np.abs(y_ref).max(), qtype.name
    return err


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE), ids=lambda t: t.name)
def test_quantized_by_gguf_is_lossless(qtype):
    arr = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
    check_lossless(quantize(arr, qtype), qtype, arr.shape)


@pytest.mark.parametrize("qtype", list(MLX_EXACT), ids=lambda t: t.name)
def test_random_blocks_are_lossless(qtype):
    # Random bytes reach every q value and every high-bit/scale pattern, K-quants included.
    check_lossless(random_blocks(qtype, 64, 512), qtype, (64, 512))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_packing_matches_mlx_quantize(bits):
    top = 2**bits - 1
    q = np.random.default_rng(bits).integers(0, top + 1, size=(4, 256)).astype(np.uint8)
    q[:, ::32], q[:, 1::32] = 0, top  # each group spans [0, top], so MLX's q is exact
    w, scales, biases = mx.quantize(mx.array(q.astype(np.float32)), group_size=32, bits=bits)
    # MLX picks the negative scale here (scale -1, bias top), so it stores top - q.
    assert np.all(np.array(scales) == -1) and np.all(np.array(biases) == top)
    assert np.array_equal(np.array(w), pack(top - q, bits))


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K, T.Q2_K, T.F32])
def test_inexact_types_raise(qtype):
    data = np.zeros((2, gguf.GGML_QUANT_SIZES[qtype][1] * 256 // gguf.GGML_QUANT_SIZES[qtype][0]), np.uint8)
    with pytest.raises(ValueError, match=qtype.name):
        to_mlx_affine(data, qtype, (2, 256))


def test_wrong_byte_count_raises():
    with pytest.raises(ValueError, match="bytes"):
        to_mlx_affine(random_blocks(T.Q8_0, 4, 64), T.Q8_0, (4, 96))


# ---- the real Gemma 3 270M file ------------------------------------------------------------------
# gguf.GGUFReader parses all 262,144 tokenizer strings (~20 s on a small CPU); this walks the
# header just far enough to find each tensor's bytes.

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


def gguf_tensors(path) -> dict:
    """name -> (qtype, (rows, cols), raw bytes (rows, bytes_per_row)) for every 2-D tensor."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 24  # magic, version, tensor count, kv count
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(buf[pos - n : pos]).decode()

    def skip(vtype):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            item, n = take("<IQ")
            if item in _SIZES:
                pos += n * _SIZES[item]
            else:
                for _ in range(n):
                    skip(item)
        else:
            pos += _SIZES[vtype]

    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("<I")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", buf, pos)[0]
        skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, T(take("<I")), take("<Q")))
    start = -(-pos // alignment) * alignment
    out = {}
    for name, dims, qtype, offset in infos:
        if len(dims) == 2:
            cols, rows = dims  # GGUF lists dims innermost first
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = np.frombuffer(buf, np.uint8, rows * cols // block * size, start + offset)
            out[name] = (qtype, (rows, cols), data.reshape(rows, -1))
    return out


@pytest.fixture(scope="module")
def real(gguf_270m):
    return gguf_tensors(gguf_270m)


@pytest.mark.parametrize(
    "name, qtype",
    [("token_embd.weight", T.Q8_0), ("blk.0.attn_q.weight", T.Q5_0), ("blk.0.attn_output.weight", T.Q4_K)],
    ids=["Q8_0-token_embd", "Q5_0-attn_q", "Q4_K-attn_output"],
)
def test_real_tensors_are_lossless(real, name, qtype):
    got_type, (rows, cols), data = real[name]
    assert got_type == qtype
    step = max(1, rows // 1024)  # every 256th embedding row spans the vocabulary; blocks stay whole
    data = np.ascontiguousarray(data[::step])
    check_lossless(data, qtype, (data.shape[0], cols))


def test_real_q6_k_raises(real):
    qtype, shape, data = real["blk.0.ffn_down.weight"]
    assert qtype == T.Q6_K
    with pytest.raises(ValueError, match="Q6_K"):
        to_mlx_affine(data, qtype, shape)
