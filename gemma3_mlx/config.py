"""Gemma 3 configuration: frozen dataclasses built from a checkpoint's `config.json`.

Keeps the checkpoint's own key names, ignores unknown keys, and accepts both the
transformers 4 schema (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`) and the transformers 5 schema (`rope_parameters` per layer type,
`layer_types`). Layer kinds (local/global) are derived here and nowhere else.
It does not read files: `load_config(path)` in loader.py does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LOCAL, GLOBAL = "sliding_attention", "full_attention"
TEXT_MODEL_TYPES = {"gemma3_text"}
MULTIMODAL_MODEL_TYPES = {"gemma3"}
TEXT_ARCHITECTURES = {"Gemma3ForCausalLM", "Gemma3TextModel"}
MULTIMODAL_ARCHITECTURES = {"Gemma3ForConditionalGeneration", "Gemma3Model"}


@dataclass(frozen=True)
class RopeParams:
    """RoPE base and linear position scaling (positions are divided by `factor`)."""

    rope_theta: float
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    # Defaults are those of transformers' Gemma3TextConfig: multimodal checkpoints omit
    # some text fields (attention and key/value head counts among them) and rely on them.
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262208
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    max_position_embeddings: int = 131072
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()
    rope_local: RopeParams = RopeParams(10_000.0)
    rope_global: RopeParams = RopeParams(1_000_000.0)

    @property
    def is_local(self) -> tuple[bool, ...]:
        return tuple(t == LOCAL for t in self.layer_types)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs.pop("layer_types", None)
        kwargs.pop("rope_local", None)
        kwargs.pop("rope_global", None)
        n = int(kwargs.get("num_hidden_layers", cls.num_hidden_layers))
        kwargs["layer_types"] = _layer_types(d, n)
        kwargs["rope_local"], kwargs["rope_global"] = _rope(d)
        if kwargs.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"unsupported hidden_activation {kwargs['hidden_activation']!r}")
        # Soft-capping keys (final_logit_softcapping, attn_logit_softcapping) are ignored on
        # purpose: Gemma 3 has none, though some converted configs wrongly carry them.
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers 5 schema, so the written config.json is read back identically."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("rope_local"), d.pop("rope_global")
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {
            LOCAL: _rope_dict(self.rope_local),
            GLOBAL: _rope_dict(self.rope_global),
        }
        return d


def _rope_dict(r: RopeParams) -> dict[str, Any]:
    if r.factor == 1.0:
        return {"rope_type": "default", "rope_theta": r.rope_theta}
    return {"rope_type": "linear", "factor": r.factor, "rope_theta": r.rope_theta}


def _layer_types(d: dict[str, Any], n: int) -> tuple[str, ...]:
    # Layer i is global when (i + 1) % pattern == 0; an explicit `layer_types` wins.
    types = d.get("layer_types")
    if types:
        if len(types) != n or any(t not in (LOCAL, GLOBAL) for t in types):
            raise ConfigError(f"layer_types must list {n} entries of {LOCAL!r}/{GLOBAL!r}")
        return tuple(types)
    pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
    return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n))


def _rope_one(p: dict[str, Any] | None, default_theta: float) -> RopeParams:
    p = p or {}
    kind = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", default_theta))
    if kind == "default":
        return RopeParams(theta)
    if kind == "linear":
        return RopeParams(theta, float(p["factor"]))
    raise ConfigError(f"unsupported rope_type {kind!r} (Gemma 3 uses 'default' and 'linear')")


def _rope(d: dict[str, Any]) -> tuple[RopeParams, RopeParams]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (LOCAL in params or GLOBAL in params):  # transformers 5
        return _rope_one(params.get(LOCAL), 10_000.0), _rope_one(params.get(GLOBAL), 1_000_000.0)
    # transformers 4: rope_scaling applies to the global layers only.
    local = RopeParams(float(d.get("rope_local_base_freq") or 10_000.0))
    glob = dict(d.get("rope_scaling") or {})
    glob["rope_theta"] = float(d.get("rope_theta") or 1_000_000.0)
    return local, _rope_one(glob, 1_000_000.0)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (step 4 builds it); defaults are transformers' SiglipVisionConfig for Gemma 3."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def instruction_tuned_from_name(name: str, bare_gemma_is_base: bool = True) -> bool | None:
    """What a checkpoint's name says: "-it"/"instruct"/"chat" is instruction-tuned, "-pt"/"base" is not, and
    (`bare_gemma_is_base`) neither is a Gemma name without either, as Google names its base models
    ("gemma-3-270m", "gemma-3-4b-pt"). None: the name does not say."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if words & {"it", "instruct", "chat", "sft", "rlhf"}:
        return True
    if words & {"pt", "base"} or (bare_gemma_is_base and "gemma" in name.lower()):
        return False
    return None


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144
    # Quantization settings as written by the converter (step 2); None for float weights.
    quantization: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    # Our own key, recorded by the converter: True for an instruction-tuned (chat) model, False for a base
    # (pretrained) one, None when unknown. Base models continue text; the chat format means little to them.
    instruction_tuned: bool | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        archs = set(d.get("architectures") or ())
        if model_type in MULTIMODAL_MODEL_TYPES or (model_type is None and archs & MULTIMODAL_ARCHITECTURES):
            vision = d.get("vision_config")
            return cls(
                model_type="gemma3",
                text=TextConfig.from_dict(d.get("text_config") or {}),
                vision=VisionConfig.from_dict(vision) if vision is not None else VisionConfig(),
                mm_tokens_per_image=int(d.get("mm_tokens_per_image", 256)),
                boi_token_index=int(d.get("boi_token_index", 255_999)),
                eoi_token_index=int(d.get("eoi_token_index", 256_000)),
                image_token_index=int(d.get("image_token_index", d.get("image_token_id", 262_144))),
                quantization=d.get("quantization"),
                instruction_tuned=d.get("instruction_tuned"),
            )
        if model_type in TEXT_MODEL_TYPES or (model_type is None and archs & TEXT_ARCHITECTURES):
            return cls(model_type="gemma3_text", text=TextConfig.from_dict(d), quantization=d.get("quantization"),
                       instruction_tuned=d.get("instruction_tuned"))
        what = model_type or ", ".join(sorted(archs)) or "unknown"
        raise ConfigError(f"not a Gemma 3 checkpoint (model_type {what!r}); expected gemma3 or gemma3_text")

    def to_dict(self) -> dict[str, Any]:
        if self.model_type == "gemma3_text":
            d = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **self.text.to_dict()}
        else:
            d = {
                "model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": {"model_type": "gemma3_text", **self.text.to_dict()},
                "vision_config": {"model_type": "siglip_vision_model", **self.vision.to_dict()},
                "mm_tokens_per_image": self.mm_tokens_per_image,
                "boi_token_index": self.boi_token_index,
                "eoi_token_index": self.eoi_token_index,
                "image_token_index": self.image_token_index,
            }
        if self.quantization:
            d["quantization"] = self.quantization
        if self.instruction_tuned is not None:
            d["instruction_tuned"] = self.instruction_tuned
        return d
