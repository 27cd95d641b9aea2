"""Gemma's RMSNorm, shared by the decoder (model.py) and the vision projector (vision.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # Gemma norms scale by (1 + w), not w.
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)
