"""How much memory a model needs, and whether this machine has it.

`needs(path)` reads only the safetensors headers and config.json: the bytes the loaded weights
take on this backend (float32 on the CPU, with quantized matrices expanded, as loader.py does;
bfloat16 and packed on GPUs), plus the KV cache and activations at a context. `machine_memory()`
is what this machine can give a model: MLX's device report where it has one (on Apple silicon the
GPU's recommended working set), else physical memory, lowered by a cgroup limit.
`ensure_fits(path)` raises DoesNotFit (one line) before a load that would swap the machine to a halt.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .cache import kv_bytes
from .config import ModelConfig
from .errors import Gemma3Error, ModelFileError
from .loader import DTYPES, default_dtype, load_config
from .safetensors_io import SafetensorsFile, checkpoint_files
from .vision import vision_name
from .weights import sanitize_name

# Measured on the 270M (tests/benchmarks/memory.py): Python, MLX and the tokenizer's tables.
RUNTIME_BYTES = 200 << 20
PREFILL_CHUNK = 512  # prompt_cache.prefill's chunk: what the activations below are sized for
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ENV = "GEMMA3_MLX_MEMORY"  # "16G": the memory to plan for (leave room for other apps; tests)


class DoesNotFit(Gemma3Error):
    """A model that needs more memory than this machine has."""


@dataclass
class Needs:
    weights: int  # bytes the loaded weights take
    kv: int  # KV cache at `context`
    activations: int  # a prefill chunk's largest intermediates at `context`
    context: int
    dtype: mx.Dtype
    expanded: bool  # quantized matrices expanded to `dtype` (the CPU backend)

    @property
    def to_load(self) -> int:
        return self.weights + RUNTIME_BYTES

    @property
    def to_run(self) -> int:
        return self.to_load + self.kv + self.activations


def needs(path: str | Path, context: int = 8192, kv_bits: int | None = None, dtype: mx.Dtype | None = None,
          dequantize: bool | None = None, config: ModelConfig | None = None, plan=None, checkpoint=None) -> Needs:
    """Memory `load(path)` and a generation of `context` tokens need, from the files' headers alone.
    `plan`: a shard.Plan: that rank's share of the weights and of the KV cache (activations as alone).
    `checkpoint`: the directory's loader.Checkpoint when the caller has read it (its config and headers)."""
    path = Path(path)
    config = checkpoint.config if checkpoint is not None else config or load_config(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype())
    expand = bool(config.quantization) and (mx.default_device() == mx.cpu if dequantize is None else dequantize)
    size = mx.float32.size if dtype == mx.float32 else 2
    t = config.text
    share = {} if plan is None else {"layers": plan.layers, "kv_heads": plan.kv_range[1] - plan.kv_range[0]}
    kv = kv_bytes(config, context, bytes_per_value=size, kv_bits=kv_bits, **share)
    chunk = min(context, PREFILL_CHUNK)
    # Attention scores of a global layer over the whole context, or the MLP's three intermediates.
    act = max(t.num_attention_heads * chunk * context * 4, 3 * chunk * t.intermediate_size * size)
    act += t.vocab_size * 4  # the last position's logits
    if checkpoint is not None:
        return Needs(_from_headers(checkpoint.files, config, size, expand, plan), kv, act, context, dtype, expand)
    try:
        paths = checkpoint_files(path)
    except ModelFileError:  # a config.json alone (a hub id described without downloading it)
        return Needs(_from_config(config, size, expand, plan), kv, act, context, dtype, expand)
    files = [SafetensorsFile(f) for f in paths]
    return Needs(_from_headers(files, config, size, expand, plan), kv, act, context, dtype, expand)


def _from_headers(files: list[SafetensorsFile], config: ModelConfig, size: int, expand: bool, plan=None) -> int:
    shapes = {k: (f.shape(k), f.dtype(k)) for f in files for k in f.names
              if sanitize_name(k) is not None or (config.vision is not None and vision_name(k) is not None)}
    total = 0
    for k, (shape, kind) in shapes.items():
        n = _tensor_bytes(k, shape, kind, shapes, config, size, expand)
        total += n if plan is None else int(n * plan.share(sanitize_name(k) or vision_name(k), shape))
    return total


def _tensor_bytes(k: str, shape, kind: str, shapes: dict, config: ModelConfig, size: int, expand: bool) -> int:
    """What checkpoint tensor `k` takes once loaded."""
    to = 4 if config.vision is not None and vision_name(k) is not None else size  # the tower runs in float32
    module = k.rsplit(".", 1)[0]
    if expand and f"{module}.scales" in shapes:  # quantized, expanded: the packed weight becomes
        if k.endswith(".weight"):  # scales' groups x group size values; scales and biases go
            return _count(shapes[f"{module}.scales"][0]) * _group_size(config.quantization, module) * to
        return 0
    return _count(shape) * (to if kind in ("F32", "F16", "BF16", "F64") else _SIZES[kind])


def _from_config(config: ModelConfig, size: int, expand: bool, plan=None) -> int:
    """The text model's bytes from the shapes its config implies (the vision tower left out)."""
    q = config.quantization
    # packed values plus a scale and a bias per group, in the compute dtype
    per = int(q.get("bits", 4)) / 8 + 2 * size / int(q.get("group_size", 64)) if q and not expand else size
    total = 0.0
    for name, shape in config_tensors(config):
        share = 1.0 if plan is None else plan.share(name, shape)
        total += _count(shape) * (per if len(shape) == 2 else size) * share
    return int(total)


def config_tensors(config: ModelConfig):
    """(MLX name, shape) of each text-model weight a config implies, as a checkpoint would hold them."""
    t = config.text
    D, hd, I, H, KV = t.hidden_size, t.head_dim, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads
    yield "model.embed_tokens.weight", (t.vocab_size, D)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, shape in (("q_proj", (H * hd, D)), ("k_proj", (KV * hd, D)), ("v_proj", (KV * hd, D)),
                            ("o_proj", (D, H * hd))):
            yield f"{p}self_attn.{proj}.weight", shape
        for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
            yield f"{p}mlp.{proj}.weight", shape
        for norm in ("q_norm", "k_norm"):
            yield f"{p}self_attn.{norm}.weight", (hd,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            yield f"{p}{norm}.weight", (D,)
    yield "model.norm.weight", (D,)


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _group_size(settings: dict, module: str) -> int:
    s = settings.get(module, settings)
    return int(s.get("group_size", 64)) if isinstance(s, dict) else 64


def machine_memory() -> int:
    """Bytes this machine can give a model (see the module docstring); GEMMA3_MLX_MEMORY overrides."""
    if os.environ.get(ENV):
        return parse_bytes(os.environ[ENV])
    info = {}
    for get in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        try:
            info = get() if get else {}
        except Exception:  # no such device (a CPU-only build asked about Metal)
            info = {}
        if info:
            break
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return info[key]
    return _os_memory()


def _os_memory() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def parse_bytes(text: str) -> int:
    """"16G", "512M", "1.5T", "123456" -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise Gemma3Error(f"{ENV}={text!r}: give a size such as 16G or 512M")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def describe(n: Needs) -> str:
    """Why the weights take what they do, in a few words."""
    kind = "float32" if n.dtype == mx.float32 else "bfloat16"
    return f"{kind} weights" + ("; the CPU backend expands quantized matrices" if n.expanded else "")


def ensure_fits(path: str | Path, config: ModelConfig | None = None, dtype: mx.Dtype | None = None,
                checkpoint=None) -> Needs:
    """Raise DoesNotFit unless this machine has the memory to load the model at `path` (`checkpoint`: as in needs)."""
    n = needs(path, dtype=dtype, config=config, checkpoint=checkpoint)
    have = machine_memory()
    if n.to_load > have:
        raise DoesNotFit(f"{Path(path).name} needs about {gb(n.to_load)} to load ({describe(n)}) and this machine "
                         f"has {gb(have)}: choose a smaller or more quantized model (gemma3 info shows what each needs)")
    return n
