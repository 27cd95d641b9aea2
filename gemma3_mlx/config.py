"""Gemma 3 configuration: frozen dataclasses built from a checkpoint's `config.json`.

Keeps the checkpoint's own key names, ignores unknown keys, and accepts both the
transformers 4 schema (`rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`) and the transformers 5 schema (`rope_parameters` per layer type,
`layer_types`). Layer kinds (local/global) are derived here and nowhere else.
Every value is checked for its type and a sane range (`LIMITS`) before anything is built from it,
so a damaged config is refused with one line naming the field. It does not read files:
`load_config(path)` in loader.py does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LOCAL, GLOBAL = "sliding_attention", "full_attention"
TEXT_MODEL_TYPES = {"gemma3_text"}
MULTIMODAL_MODEL_TYPES = {"gemma3"}
TEXT_ARCHITECTURES = {"Gemma3ForCausalLM", "Gemma3TextModel"}
MULTIMODAL_ARCHITECTURES = {"Gemma3ForConditionalGeneration", "Gemma3Model"}


# Sane ranges, far beyond any Gemma 3 (27B: 62 layers, hidden 5376, 21504 MLP, vocab 262208, 128K context),
# so that a damaged config is refused before a model of a million layers is built from it.
LIMITS = {
    "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22), "sliding_window": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24),
    "sliding_window_pattern": (1, 1024), "num_channels": (1, 4), "image_size": (1, 1 << 14),
    "patch_size": (1, 1 << 10), "mm_tokens_per_image": (1, 1 << 16),
    "boi_token_index": (0, 1 << 22), "eoi_token_index": (0, 1 << 22), "image_token_index": (0, 1 << 22),
}
FLOAT_LIMITS = {"rms_norm_eps": (0.0, 1.0), "layer_norm_eps": (0.0, 1.0), "query_pre_attn_scalar": (0.0, 1e9),
                "rope_theta": (0.0, 1e12), "factor": (0.0, 1e6)}


def checked(name: str, value: Any, label: str | None = None) -> int | float:
    """`value` as the int (LIMITS) or float (FLOAT_LIMITS, exclusive of the low end) `name` must be;
    ConfigError naming `label` (default: `name`) otherwise. Integral floats (1e3) count as ints."""
    label = label or name
    if name in FLOAT_LIMITS:
        lo, hi = FLOAT_LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        if not lo < value <= hi:
            raise ConfigError(f"{label} is {value!r}, outside ({lo:g}, {hi:g}]")
        return float(value)
    lo, hi = LIMITS[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{label} is {value:,}, outside {lo:,} to {hi:,}")
    return value


def _checked_fields(d: dict[str, Any], fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The known keys of `d` (None meaning the default), each checked against its field's type."""
    out = {}
    for k, v in d.items():
        if k not in fields or v is None:
            continue
        if k in LIMITS or k in FLOAT_LIMITS:
            v = checked(k, v, prefix + k)
        elif isinstance(fields[k].default, str) and not isinstance(v, str):
            raise ConfigError(f"{prefix}{k} must be a string, got {v!r}"[:200])
        elif isinstance(fields[k].default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{prefix}{k} must be true or false, got {v!r}"[:200])
        out[k] = v
    return out


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
        if not isinstance(d, dict):
            raise ConfigError(f"text_config must be an object, got {d!r}"[:200])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k in ("layer_types", "rope_local", "rope_global"):
            fields.pop(k)
        kwargs = _checked_fields(d, fields)
        heads = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if heads % kwargs.get("num_key_value_heads", cls.num_key_value_heads):
            raise ConfigError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                              f"({kwargs.get('num_key_value_heads', cls.num_key_value_heads)})")
        window, context = (kwargs.get(k, getattr(cls, k)) for k in ("sliding_window", "max_position_embeddings"))
        if window > context:  # each local layer allocates its window up front
            raise ConfigError(f"sliding_window {window:,} is larger than max_position_embeddings {context:,}")
        n = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
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
        if not isinstance(types, list) or len(types) != n or any(t not in (LOCAL, GLOBAL) for t in types):
            raise ConfigError(f"layer_types must list {n} entries of {LOCAL!r}/{GLOBAL!r}")
        return tuple(types)
    pattern = checked("sliding_window_pattern", d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
    return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n))


def _rope_one(p: dict[str, Any] | None, default_theta: float, where: str) -> RopeParams:
    p = {} if p is None else p
    if not isinstance(p, dict):
        raise ConfigError(f"{where} must be an object, got {p!r}"[:200])
    kind = p.get("rope_type", p.get("type", "default"))
    theta = checked("rope_theta", p.get("rope_theta", default_theta), f"{where}.rope_theta")
    if kind == "default":
        return RopeParams(theta)
    if kind == "linear":
        if "factor" not in p:
            raise ConfigError(f"{where}: rope_type 'linear' needs a factor")
        return RopeParams(theta, checked("factor", p["factor"], f"{where}.factor"))
    raise ConfigError(f"{where}: unsupported rope_type {kind!r} (Gemma 3 uses 'default' and 'linear')"[:200])


def _rope(d: dict[str, Any]) -> tuple[RopeParams, RopeParams]:
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}"[:200])
    if params and (LOCAL in params or GLOBAL in params):  # transformers 5
        return (_rope_one(params.get(LOCAL), 10_000.0, f"rope_parameters.{LOCAL}"),
                _rope_one(params.get(GLOBAL), 1_000_000.0, f"rope_parameters.{GLOBAL}"))
    # transformers 4: rope_scaling applies to the global layers only.
    local = RopeParams(checked("rope_theta", d.get("rope_local_base_freq") or 10_000.0, "rope_local_base_freq"))
    scaling = d.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}"[:200])
    glob = {**scaling, "rope_theta": d.get("rope_theta") or 1_000_000.0}
    return local, _rope_one(glob, 1_000_000.0, "rope_scaling")


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
        if not isinstance(d, dict):
            raise ConfigError(f"vision_config must be an object, got {d!r}"[:200])
        return cls(**_checked_fields(d, {f.name: f for f in dataclasses.fields(cls)}, "vision_config."))

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


QUANT_BITS, QUANT_GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def _quantization(d: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's "quantization": defaults `bits`/`group_size`/`mode`, and per-module overrides."""
    q = d.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"quantization must be an object with bits and group_size, got {q!r}"[:200])
    for where, s in [("quantization", q), *((f"quantization.{k}", v) for k, v in q.items() if isinstance(v, dict))]:
        if s.get("bits") not in QUANT_BITS or isinstance(s.get("bits"), bool):
            raise ConfigError(f"{where}.bits is {s.get('bits')!r}, not one of {QUANT_BITS}"[:200])
        if s.get("group_size") not in QUANT_GROUP_SIZES or isinstance(s.get("group_size"), bool):
            raise ConfigError(f"{where}.group_size is {s.get('group_size')!r}, not one of {QUANT_GROUP_SIZES}"[:200])
        if not isinstance(s.get("mode", "affine"), str):
            raise ConfigError(f"{where}.mode must be a string, got {s['mode']!r}"[:200])
    return q


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
        if model_type is not None and not isinstance(model_type, str):
            raise ConfigError(f"model_type must be a string, got {model_type!r}"[:200])
        archs = d.get("architectures") or []
        archs = {a for a in archs if isinstance(a, str)} if isinstance(archs, list) else set()
        if d.get("instruction_tuned") not in (None, True, False):
            raise ConfigError(f"instruction_tuned must be true, false or null, got {d['instruction_tuned']!r}"[:200])
        if model_type in MULTIMODAL_MODEL_TYPES or (model_type is None and archs & MULTIMODAL_ARCHITECTURES):
            vision = d.get("vision_config")
            c = cls(
                model_type="gemma3",
                text=TextConfig.from_dict(d.get("text_config") or {}),
                vision=VisionConfig.from_dict(vision) if vision is not None else VisionConfig(),
                mm_tokens_per_image=checked("mm_tokens_per_image", d.get("mm_tokens_per_image", 256)),
                boi_token_index=checked("boi_token_index", d.get("boi_token_index", 255_999)),
                eoi_token_index=checked("eoi_token_index", d.get("eoi_token_index", 256_000)),
                image_token_index=checked("image_token_index", d.get("image_token_index", d.get("image_token_id", 262_144))),
                quantization=_quantization(d),
                instruction_tuned=d.get("instruction_tuned"),
            )
            for name in ("boi_token_index", "eoi_token_index"):  # the image soft token may lie past the table
                if getattr(c, name) >= c.text.vocab_size:
                    raise ConfigError(f"{name} {getattr(c, name):,} is not below vocab_size {c.text.vocab_size:,}")
            return c
        if model_type in TEXT_MODEL_TYPES or (model_type is None and archs & TEXT_ARCHITECTURES):
            return cls(model_type="gemma3_text", text=TextConfig.from_dict(d), quantization=_quantization(d),
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
