"""What checkpoint readers hand the converter: plain float arrays, or tensors already quantized."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np


class QuantizedTensor(NamedTuple):
    """MLX affine quantization: value = scales * q + biases per group of `group_size` (q packed in uint32)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    origin: str  # for the report, e.g. "Q4_K (exact)"


class FloatTensor(NamedTuple):
    """A float array and where it came from (a GGUF block type such as "Q6_K" or "F32")."""

    value: np.ndarray | mx.array
    origin: str
