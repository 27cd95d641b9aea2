"""Quantize float weights into MLX affine groups, searching each group's scale and offset.

MLX's affine mode stores, per group of `group_size` consecutive values along the last axis,
`value = scale * q + bias` with unsigned `bits`-bit q packed into uint32 words. `quantize`
returns exactly the (weight, scales, biases) that `mx.dequantize`, `mx.quantized_matmul(...,
transpose=True)`, `nn.QuantizedLinear` and `nn.QuantizedEmbedding` take (q packed into
MLX's words by the runtime's packing.py).

method "rtn" is plain min/max round-to-nearest. method "search" (the default) lowers each
group's squared error: it tries a small grid of clipping ranges (the min and the max shrunk
independently by fractions of one RTN step), fits the least-squares scale and bias to each
candidate's q, takes a few alternating round/refit steps from the best, and finally keeps
RTN for any group where that is not strictly better, so no group is ever worse than RTN.

`quantize` sees only the weights. `quantize_gptq` also takes a layer's input Hessian (gathered
by calibrate.py) and rounds to lower the layer's output error instead (GPTQ). Neither chooses
bits per layer or handles the mxfp4/mxfp8/nvfp4 modes. It works in float32
numpy a chunk of rows at a time, so memory stays bounded for any matrix size. Scales and
biases come back in float32; the converter stores them in float16 (measured: no KL change on the 270M).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from ..packing import pack

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "search")

# "search" tries every (min shrink, max shrink) pair, in units of the group's RTN step.
# Measured on Gaussian and Gemma 3 270M rows: a 4x4 grid over [0, 1] step gets nearly all of
# what finer or wider grids get; the alternating refits after it add 1-2% more.
SHRINKS = (0.0, 1 / 3, 2 / 3, 1.0)
REFITS = 2
CHUNK_VALUES = 1 << 18  # values per chunk of rows: about 1 MB of float32, cache-sized


def quantize(
    w: mx.array | np.ndarray, bits: int, group_size: int, method: str = "search"
) -> tuple[mx.array, mx.array, mx.array]:
    """Float (..., cols) -> (packed uint32 weight, float32 scales, float32 biases), MLX affine mode.

    Shapes: weight (..., cols * bits / 32), scales and biases (..., cols / group_size).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, not {group_size}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    *lead, cols = w.shape
    if cols % group_size:
        raise ValueError(f"last dimension {cols} is not divisible by group_size {group_size}")
    is_float = mx.issubdtype(w.dtype, mx.floating) if isinstance(w, mx.array) else np.issubdtype(w.dtype, np.floating)
    if not is_float:
        raise ValueError(f"quantize takes float weights, not {w.dtype}")

    w = w.reshape(-1, cols)
    rows, groups, n = w.shape[0], cols // group_size, 2**bits - 1
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, groups), np.float32)
    biases = np.empty((rows, groups), np.float32)
    step = max(1, CHUNK_VALUES // cols)

    def work(i, x):
        x = x.reshape(-1, groups, group_size)  # (R, G, g)
        q, s, b = _rtn(x, n) if method == "rtn" else _search(x, n)
        packed[i : i + step] = pack(q.reshape(-1, cols), bits)
        scales[i : i + step], biases[i : i + step] = s[..., 0], b[..., 0]

    _run_parallel(work, _row_chunks(w, step))
    out = (packed.reshape(*lead, -1), scales.reshape(*lead, groups), biases.reshape(*lead, groups))
    return tuple(mx.array(a) for a in out)


def _row_chunks(w, step: int):
    """(first row, float32 numpy rows) of a (rows, cols) matrix, `step` rows at a time. Converted per
    chunk, in the caller's thread: bfloat16 mx arrays have no numpy form, and a float32 copy of a
    whole 27B-model matrix is not needed at once."""
    for i in range(0, w.shape[0], step):
        chunk = w[i : i + step]
        chunk = np.array(chunk.astype(mx.float32)) if isinstance(chunk, mx.array) else chunk
        yield i, np.asarray(chunk, np.float32)  # (R, cols); never written to


def _run_parallel(work, items, workers: int | None = None) -> None:
    """work(*item) for each item, on a few threads (numpy releases the GIL in its array loops);
    at most 2 x workers items are in flight, so memory stays a few chunks."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1:
        for item in items:
            work(*item)
        return
    pending = deque()
    with ThreadPoolExecutor(workers) as pool:
        for item in items:
            pending.append(pool.submit(work, *item))
            if len(pending) >= 2 * workers:
                pending.popleft().result()
        for f in pending:
            f.result()


def dequantize(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """Unpacked q (..., cols) with per-group scales and biases -> float32 values (numpy reference)."""
    *lead, cols = q.shape
    qg = q.reshape(*lead, cols // group_size, group_size).astype(np.float32)
    return (scales[..., None] * qg + biases[..., None]).reshape(*lead, cols)


def _round(x: np.ndarray, lo: np.ndarray, inv: np.ndarray, n: int) -> np.ndarray:
    """Nearest grid point: q = clip(round((x - lo) * inv), 0, n) as float32 (R, G, g)."""
    q = np.subtract(x, lo, dtype=np.float32)
    q *= inv
    np.rint(q, out=q)
    np.maximum(q, 0, out=q)
    return np.minimum(q, n, out=q)


def _rtn(x: np.ndarray, n: int):
    """Min/max round-to-nearest; constant groups get scale 0 and bias = the value (exact)."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    scale = (hi - lo) / np.float32(n)  # (R, G, 1)
    return _round(x, lo, _inverse(scale), n), scale, lo


def _inverse(scale: np.ndarray) -> np.ndarray:
    """1 / scale, or 0 where that is not finite: such groups (constant, or a range so small
    that it underflows) round to q = 0 and keep their min as the bias, instead of NaN."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / scale
    return np.where(np.isfinite(inv), inv, np.float32(0))


def _sq_error(x, q, s, b) -> np.ndarray:
    """Sum of squared reconstruction errors per group, computed as MLX dequantizes (float32)."""
    r = s * q + b - x
    return np.einsum("rgi,rgi->rg", r, r)[..., None]


def _search(x: np.ndarray, n: int):
    """Grid of clipping ranges + least-squares fits + alternating refits; see the module docstring.
    numpy, not MLX: one candidate over 2.6M values took 4.4 ms here against 8.8 ms for mx.compile."""
    g = x.shape[-1]
    q0, s0, b0 = _rtn(x, n)
    lo0, hi0 = b0, b0 + s0 * n
    mean = x.mean(-1, keepdims=True, dtype=np.float64)
    xc = (x - mean).astype(np.float32)  # centred, so sum(xc * q) needs no mean correction
    sxx = np.einsum("rgi,rgi->rg", xc, xc, dtype=np.float64)[..., None]

    def fit(q):
        """Least-squares scale and bias for fixed q, and the error they leave: (R, G, 1) each."""
        # Integer sums below 2**24 (128 * 255**2 at most): exact in float32.
        sq = q.sum(-1, keepdims=True).astype(np.float64)
        sqq = np.einsum("rgi,rgi->rg", q, q)[..., None].astype(np.float64)
        sxq = np.einsum("rgi,rgi->rg", xc, q)[..., None].astype(np.float64)
        var_q = sqq - sq * sq / g
        s = np.divide(sxq, var_q, out=np.zeros_like(var_q), where=var_q > 0)
        return s, mean - s * sq / g, sxx - s * sxq

    best = None  # (err, rounding lo, rounding inv, fitted scale, fitted bias)
    for a in SHRINKS:
        for c in SHRINKS:
            lo, hi = lo0 + a * s0, hi0 - c * s0
            inv = _inverse((hi - lo) / np.float32(n))
            s, b, err = fit(_round(x, lo, inv, n))
            best = _keep_better(best, (err, lo, inv, s, b))
    for _ in range(REFITS):  # alternate: round to the fitted grid, refit to those q
        err, _, _, s, b = best
        lo = b.astype(np.float32)
        inv = _inverse(s.astype(np.float32))
        s, b, err = fit(_round(x, lo, inv, n))
        best = _keep_better(best, (err, lo, inv, s, b))

    _, lo, inv, s, b = best
    q, s, b = _round(x, lo, inv, n), s.astype(np.float32), b.astype(np.float32)
    # The errors above are estimates from float sums; compare with RTN exactly, as stored.
    rtn_wins = _sq_error(x, q0, s0, b0) <= _sq_error(x, q, s, b)
    return np.where(rtn_wins, q0, q), np.where(rtn_wins, s0, s), np.where(rtn_wins, b0, b)


def _keep_better(best, cand):
    """Per group, the candidate tuple with the lower error (first field)."""
    if best is None:
        return cand
    take = cand[0] < best[0]
    return tuple(np.where(take, c, o) for c, o in zip(cand, best))


# ---- calibrated: GPTQ-style error-compensating rounding --------------------------------------

DAMP = 0.01  # of the mean diagonal, added to H before inverting (GPTQ's default)
ACT_ORDER = True  # round columns in decreasing order of H's diagonal, on fixed grids (measured: KL 0.124 vs 0.136)
BLOCK = 32  # columns updated lazily together (divides every group size): small keeps the
# column-by-column updates cheap, the rest goes through one matmul per block
GPTQ_CHUNK_VALUES = 1 << 22  # values per chunk of rows: GPTQ's per-column steps want long rows


def quantize_gptq(
    w: mx.array | np.ndarray, hessian: np.ndarray, bits: int, group_size: int, damp: float = DAMP,
    act_order: bool = ACT_ORDER,
) -> tuple[mx.array, mx.array, mx.array]:
    """Like `quantize`, but lowering the output error on calibration inputs X instead of the weight
    error: per row r, (w_r - dq_r) H (w_r - dq_r)^T with H = X^T X (cols, cols), the layer's input
    second moments. Columns are rounded one by one, and each rounding error is spread over the
    columns not yet rounded with the inverse Hessian (GPTQ, Frantar et al. 2022). With act_order
    (the default) columns go in decreasing order of H's diagonal, on the grids `quantize`'s clipping
    search picks; otherwise left to right, each group's grid searched on its columns as updated so
    far. Scales and biases are rounded to float16 as stored. Rows where this is not better on H than
    `quantize`'s own rows keep those: never worse than uncalibrated on the calibration data.
    """
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"bits must be one of {BITS} and group_size one of {GROUP_SIZES}")
    cols = w.shape[-1]
    if w.ndim != 2 or cols % group_size or hessian.shape != (cols, cols):
        raise ValueError(f"quantize_gptq takes a (rows, cols) matrix, cols divisible by group_size, "
                         f"and a (cols, cols) Hessian; got {w.shape} and {hessian.shape}")
    rows, groups, n = w.shape[0], cols // group_size, 2**bits - 1
    h = np.asarray(hessian, np.float64)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else None
    u = _inverse_hessian_factor(h if perm is None else h[perm][:, perm], damp).astype(np.float32)
    h32 = h.astype(np.float32)
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, groups), np.float32)
    biases = np.empty((rows, groups), np.float32)
    step = max(16, GPTQ_CHUNK_VALUES // cols)

    def work(i, x):
        q0, s0, b0 = _search(x.reshape(-1, groups, group_size), n)  # exactly what `quantize` stores
        q0, s0, b0 = q0.reshape(-1, cols), _f16(s0[..., 0]), _f16(b0[..., 0])
        q, s, b = _gptq_rows(x.copy(), u, n, group_size, perm, (s0, b0))
        # Output error on the calibration inputs, per row: e H e^T, for both candidates.
        e = _dequant(q, s, b, group_size) - x
        e0 = _dequant(q0, s0, b0, group_size) - x
        keep = np.einsum("rc,rc->r", e @ h32, e) < np.einsum("rc,rc->r", e0 @ h32, e0)
        q, s, b = (np.where(keep[:, None], a, a0) for a, a0 in ((q, q0), (s, s0), (b, b0)))
        packed[i : i + step] = pack(q, bits)
        scales[i : i + step], biases[i : i + step] = s, b

    _run_parallel(work, _row_chunks(w, step), workers=1 if rows <= step else None)
    return mx.array(packed), mx.array(scales), mx.array(biases)


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U), float64.
    Columns no input ever used (zero diagonal) get a unit diagonal: any rounding of them is free."""
    h = h.copy()
    d = np.diag(h).copy()
    dead = d <= 0
    d[dead] = 1.0
    np.fill_diagonal(h, d + damp * max(float(np.mean(d)), 1e-12))
    inv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1
    hinv = inv.T @ inv
    return np.linalg.cholesky(hinv).T


def _gptq_rows(w: np.ndarray, u: np.ndarray, n: int, group_size: int, perm=None, grids=None):
    """GPTQ over a chunk of rows w (R, C): (q (R, C), scales, biases (R, G)).

    Natural order: each group's grid is searched when its first column is reached. With `perm`
    (act order: columns by decreasing H diagonal, u factored in that order), the grids are fixed
    up front (`grids`: scales, biases (R, G)), since a group's columns are then spread out.
    Works on the transpose, so that each column's values are contiguous in memory."""
    R, C = w.shape
    wt = np.ascontiguousarray((w if perm is None else w[:, perm]).T)  # (C, R)
    G = C // group_size
    if perm is not None:
        st, bt = (np.ascontiguousarray(a.T) for a in grids)  # (G, R)
        it = _inverse(st)
    else:
        st, bt, it = (np.empty((G, R), np.float32) for _ in range(3))
    q = np.empty((C, R), np.float32)
    e = np.empty(R, np.float32)
    for i1 in range(0, C, BLOCK):
        i2 = min(i1 + BLOCK, C)
        err = np.empty((i2 - i1, R), np.float32)
        for j in range(i2 - i1):
            c = i1 + j
            g = (perm[c] if perm is not None else c) // group_size
            if perm is None and c % group_size == 0:  # this group's grid, from its columns as updated so far
                _, s, b = _search(np.ascontiguousarray(wt[c : c + group_size].T).reshape(R, 1, group_size), n)
                st[g], bt[g] = _f16(s[:, 0, 0]), _f16(b[:, 0, 0])
                it[g] = _inverse(st[g])
            col, qc = wt[c], q[c]
            np.subtract(col, bt[g], out=qc)
            qc *= it[g]
            np.rint(qc, out=qc)
            np.clip(qc, 0, n, out=qc)
            np.multiply(st[g], qc, out=e)  # e = (col - dequantized) / u_cc: the error to spread
            e += bt[g]
            np.subtract(col, e, out=e)
            e /= u[c, c]
            wt[c + 1 : i2] -= u[c, c + 1 : i2, None] * e
            err[j] = e
        if i2 < C:
            wt[i2:] -= u[i1:i2, i2:].T @ err
    q = q.T
    if perm is not None:
        q = q[:, np.argsort(perm)]
    return np.ascontiguousarray(q), np.ascontiguousarray(st.T), np.ascontiguousarray(bt.T)


def _f16(a: np.ndarray) -> np.ndarray:
    """As the converter stores scales and biases (float16 where finite), back in float32."""
    h = a.astype(np.float16)
    return np.where(np.isfinite(h), h.astype(np.float32), a).astype(np.float32)


def _dequant(q: np.ndarray, s: np.ndarray, b: np.ndarray, group_size: int) -> np.ndarray:
    R, C = q.shape
    return (q.reshape(R, -1, group_size) * s[..., None] + b[..., None]).reshape(R, C)
