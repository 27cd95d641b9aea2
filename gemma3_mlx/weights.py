"""A checkpoint's weights under MLX parameter names, one tensor at a time.

Hugging Face checkpoints (transformers 4 and 5, text-only and multimodal) and converted MLX
directories name the same parameters differently: `sanitize_name` maps the text model's keys,
vision.sanitize_vision the tower's. Shared by the loader and the converter; it reads no
config.json, casts nothing and builds no model.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from .safetensors_io import SafetensorsFile
from .vision import sanitize_vision


def sanitize_name(name: str) -> str | None:
    """Checkpoint key -> MLX parameter name; None for keys the text model does not use."""
    if name == "lm_head.weight":
        return None  # the output head is tied to the embedding matrix
    for prefix in ("language_model.model.", "model.language_model."):  # transformers 4 / 5 multimodal
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith(("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")):
        return None  # the vision tower's keys: vision.sanitize_vision
    return name


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The text model's weights of a checkpoint dict, under MLX names."""
    out = {}
    for k, v in weights.items():
        name = sanitize_name(k)
        if name is not None:
            out[name] = v
    return out


def checkpoint_weights(files: list[SafetensorsFile], vision: bool) -> Iterator[tuple[str, mx.array]]:
    """(MLX name, array) for each weight the model uses, in file order, at the checkpoint's
    precision; the vision tower's and projector's only when `vision`."""
    for f in files:
        for k in f.names:
            name = sanitize_name(k)
            if name is not None:
                yield name, f.get(k)
            elif vision:  # a key the text model does not use may belong to the tower
                yield from sanitize_vision({k: f.get(k)}, dtype=None).items()
