"""LoRA adapters: read PEFT and mlx-lm adapters, check them against a base, and run them unmerged.

`read_adapter(path, config)` reads an adapter directory (PEFT: adapter_config.json +
adapter_model.safetensors; mlx-lm: adapter_config.json + adapters.safetensors) and checks every
tensor against the base's config before a byte of weights is read: what does not fit is one
AdapterError naming the tensor. `attach(model, adapters)` wraps each targeted Linear or
QuantizedLinear in a `LoRALinear` that adds `x @ A @ B * scale` beside the base matmul, so the
base keeps its quantization and several adapters share it. Rows of one batch may use different
adapters (or none): `select(model, names)` sets each row's adapter before a forward pass, and each
LoRALinear gathers its rows' A and B (mx.gather_mm; slot 0 is zero, the bare base).
It does not merge (fusing into float weights is `Adapter.delta`, used by the converter), train,
or support DoRA, embedding/head adapters or the vision tower.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import shard
from .errors import Gemma3Error
from .files import read_json
from .safetensors_io import SafetensorsFile
from .weights import sanitize_name

PEFT_FILE, MLX_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapters.safetensors", "adapter_config.json"
LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")  # a served adapter's name: no path, no spaces


class AdapterError(Gemma3Error):
    """An adapter that cannot be read or does not fit its base model."""


@dataclass
class LoRA:
    """One module's low-rank update: y += scale * (x @ a) @ b."""

    a: mx.array  # (in, r)
    b: mx.array  # (r, out)
    scale: float


@dataclass
class Adapter:
    name: str
    path: Path
    format: str  # "peft" or "mlx-lm"
    modules: dict[str, LoRA]  # MLX module path ("model.layers.0.self_attn.q_proj") -> its update
    digest: str | None = None  # of its weights, made when a prompt cache is saved (adapter_id)

    def delta(self, module: str) -> np.ndarray | None:
        """The update merged into `module`'s weight (out, in), in float32; None if not targeted."""
        m = self.modules.get(module)
        if m is None:
            return None
        a, b = np.asarray(m.a.astype(mx.float32)), np.asarray(m.b.astype(mx.float32))
        return (m.scale * (a @ b)).T

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def linear_shapes(text) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a decoder layer, from the text config."""
    D, hd, I = text.hidden_size, text.head_dim, text.intermediate_size
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    return {"self_attn.q_proj": (D, q), "self_attn.k_proj": (D, kv), "self_attn.v_proj": (D, kv),
            "self_attn.o_proj": (q, D), "mlp.gate_proj": (D, I), "mlp.up_proj": (D, I), "mlp.down_proj": (I, D)}


def max_bytes(text) -> int:
    """The largest a LoRA adapter of this model can be: every linear at full rank in float32 (+ header)."""
    per_layer = sum((i + o) * min(i, o) for i, o in linear_shapes(text).values())
    return 4 * per_layer * text.num_hidden_layers + (1 << 20)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise AdapterError(f"adapter name {name!r}: use letters, digits and - _ . : + (no paths, spaces or '..')")
    return name


def read_adapter(path: str | Path, config, name: str | None = None) -> Adapter:
    """Read and check the adapter in directory `path` (or its .safetensors file) against `config`."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter directory")
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter directory (expected {CONFIG_FILE} with adapter weights)")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path}: no {CONFIG_FILE} (is this a PEFT or mlx-lm LoRA adapter?)")
    cfg = read_json(path / CONFIG_FILE, 1 << 20, "an adapter config", AdapterError)
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path / CONFIG_FILE}: not a JSON object")
    if "lora_parameters" in cfg:
        fmt, file, scales = "mlx-lm", path / MLX_FILE, _mlx_scales(cfg, config, path)
    elif "peft_type" in cfg or {"r", "lora_alpha"} <= set(cfg):
        fmt, file, scales = "peft", path / PEFT_FILE, _peft_scales(cfg, path)
        if not file.exists() and (path / "adapter_model.bin").exists():
            raise AdapterError(f"{path}: adapter_model.bin is a pickle; save the adapter as safetensors")
    else:
        raise AdapterError(f"{path / CONFIG_FILE}: unknown adapter format (neither PEFT nor mlx-lm LoRA)")
    if not file.is_file():
        raise AdapterError(f"{path}: no {file.name} beside the {fmt} {CONFIG_FILE}")
    size, limit = file.stat().st_size, max_bytes(config.text)
    if size > limit:
        raise AdapterError(f"{file}: {size:,} bytes, more than any LoRA adapter of this base can hold "
                           f"(at most {limit:,} at full rank)")
    try:
        st = SafetensorsFile(file)
    except Gemma3Error as e:
        raise AdapterError(f"{file}: {e}") from None
    pairs = _pairs(st, fmt, config.text, file.name)
    modules = {}
    for module, (ka, kb) in sorted(pairs.items()):
        a, b = _read(st, ka, file.name), _read(st, kb, file.name)
        if fmt == "peft":
            a, b = a.T, b.T  # lora_A (r, in), lora_B (out, r) -> (in, r), (r, out)
        modules[module] = LoRA(a, b, scales(module, _peft_module_name(ka), a.shape[1]))
    if not modules:
        raise AdapterError(f"{file}: no LoRA tensors in it")
    return Adapter(check_name(name) if name else path.resolve().name, path, fmt, modules)


def _peft_module_name(key: str) -> str:
    """The module's name as PEFT patterns see it: the key without its prefix and LoRA suffix."""
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.(lora_[AB]|lora_[ab])(\.default)?(\.weight)?$", "", key)


def _mlx_scales(cfg, config, path):
    kind = cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") else "lora")
    if kind != "lora":
        raise AdapterError(f"{path}: fine_tune_type {kind!r} is not supported (LoRA adapters only)")
    p = cfg["lora_parameters"]
    if not isinstance(p, dict) or not isinstance(p.get("scale"), (int, float)) or not isinstance(p.get("rank"), int):
        raise AdapterError(f"{path / CONFIG_FILE}: lora_parameters needs a numeric rank and scale")
    n = cfg.get("num_layers")
    if isinstance(n, int) and n > config.text.num_hidden_layers:
        raise AdapterError(f"{path / CONFIG_FILE}: num_layers is {n}, the base has {config.text.num_hidden_layers} layers")
    scale, rank = float(p["scale"]), p["rank"]

    def scales(module, key, r):
        if r != rank:
            raise AdapterError(f"{key}: rank {r}, the config says {rank}")
        return scale
    return scales


def _peft_scales(cfg, path):
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA adapters only)")
    if cfg.get("use_dora"):
        raise AdapterError(f"{path}: a DoRA adapter (use_dora) is not supported; LoRA adapters only")
    if cfg.get("fan_in_fan_out") or cfg.get("lora_bias"):
        raise AdapterError(f"{path}: fan_in_fan_out and lora_bias adapters are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{path / CONFIG_FILE}: r must be a positive integer and lora_alpha a number")
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    targets, rs = cfg.get("target_modules"), bool(cfg.get("use_rslora"))

    def pattern(patterns, key, default):
        return next((v for p, v in patterns.items() if _match(rf"(.*\.)?{p}", key, path)), default)

    def scales(module, key, got):
        if not _targeted(targets, key, path):
            raise AdapterError(f"{key}: not among the config's target_modules {targets!r}")
        want, a = pattern(ranks, key, r), pattern(alphas, key, alpha)
        if got != want:
            raise AdapterError(f"{key}.lora_A.weight: rank {got}, the config says {want}")
        return a / math.sqrt(want) if rs else a / want
    return scales


def _targeted(targets, key: str, path: Path) -> bool:
    """PEFT's rule: a string is a regex over the whole module name, a list matches name suffixes."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return _match(targets, key, path)
    return any(key == t or key.endswith("." + t) for t in targets)


def _match(pattern: str, key: str, path: Path) -> bool:
    try:
        return re.fullmatch(pattern, key) is not None
    except re.error as e:
        raise AdapterError(f"{path / CONFIG_FILE}: {pattern!r} is not a valid regular expression ({e})") from None


def _pairs(st: SafetensorsFile, fmt: str, text, fname: str) -> dict[str, tuple[str, str]]:
    """MLX module path -> (A key, B key), every tensor's name and shape checked from the header."""
    suffix = {"peft": (r"lora_A", r"lora_B"), "mlx-lm": (r"lora_a", r"lora_b")}[fmt]
    shapes, found = linear_shapes(text), {}
    for key in st.names:
        m = re.fullmatch(rf"(.+)\.({suffix[0]}|{suffix[1]})(\.default)?(\.weight)?", key)
        if m is None or (fmt == "peft") != bool(m.group(4)):
            _refuse_other(key, st, text, fmt)
        module = sanitize_name(m.group(1).removeprefix("base_model.model.") + ".weight")
        if module is None and "lm_head" in key:
            _refuse_other(key, st, text, fmt)  # names the vocabulary if it is not the base's
        if module is None:
            raise AdapterError(f"{key}: adapters of the vision tower or the output head are not supported")
        module = module.removesuffix(".weight")
        lin = LINEAR.fullmatch(module)
        if lin is None:
            _refuse_other(key, st, text, fmt)
        if int(lin.group(1)) >= text.num_hidden_layers:
            raise AdapterError(f"{key}: layer {lin.group(1)}, but the base has {text.num_hidden_layers} layers "
                              f"(0 to {text.num_hidden_layers - 1})")
        i, o = shapes[lin.group(2)]
        shape, is_a = st.shape(key), m.group(2) in ("lora_A", "lora_a")
        r = shape[0 if (is_a == (fmt == "peft")) else -1] if len(shape) == 2 else 0
        want = ((r, i) if is_a else (o, r)) if fmt == "peft" else ((i, r) if is_a else (r, o))
        if len(shape) != 2 or tuple(shape) != want or r < 1:
            raise AdapterError(f"{key}: shape {tuple(shape)} does not fit the base's {module} "
                               f"({i} in, {o} out; expected {want})")
        pair = found.setdefault(module, [None, None])
        pair[0 if is_a else 1] = key
    for module, (ka, kb) in found.items():
        if ka is None or kb is None:
            raise AdapterError(f"{ka or kb}: its {'B' if kb is None else 'A'} matrix is missing from {fname}")
        ra = st.shape(ka)[0 if fmt == "peft" else 1]
        rb = st.shape(kb)[1 if fmt == "peft" else 0]
        if ra != rb:
            raise AdapterError(f"{kb}: rank {rb}, but {ka} has rank {ra}")
    return {m: tuple(p) for m, p in found.items()}


def _refuse_other(key: str, st, text, fmt: str):
    if "magnitude" in key or key.endswith(".m"):
        raise AdapterError(f"{key}: a DoRA magnitude vector; DoRA adapters are not supported")
    if "embed" in key or "lm_head" in key:
        shape = st.shape(key)
        if shape and text.vocab_size not in shape:
            raise AdapterError(f"{key}: shape {tuple(shape)} does not fit the base's vocabulary of {text.vocab_size:,}")
        raise AdapterError(f"{key}: adapters of the embedding or the output head are not supported")
    raise AdapterError(f"{key}: not a LoRA tensor of a Gemma 3 text linear layer ({fmt} format)")


def _read(st: SafetensorsFile, key: str, fname: str) -> mx.array:
    w = st.get(key).astype(mx.float32)
    if not mx.all(mx.isfinite(w)).item():
        raise AdapterError(f"{key}: NaN or infinite values in {fname}")
    return w


# ---------------------------------------------------------------------- running adapters unmerged


class Bank:
    """The adapters attached to a model, and the rows' choice for the next forward pass."""

    def __init__(self, names: list[str], default: str | None):
        self.names = names  # slot i + 1 holds names[i]; slot 0 is the bare base
        self.default = default
        self.adapters: dict[str, Adapter] = {}
        # (B,) uint32 slots, or (1,) when every row runs the same adapter, or None for the bare base.
        # A direct model(...) call runs the last selection: the default adapter until select() is called.
        self.rows: mx.array | None = self.slots([default])

    def slots(self, names) -> mx.array | None:
        slots = [self.slot(n) for n in names]
        if not any(slots):
            return None
        return mx.array(slots[:1] if len(set(slots)) == 1 else slots, dtype=mx.uint32)

    def slot(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.names:
            raise AdapterError(f"no adapter named {name!r} (loaded: {', '.join(self.names) or 'none'})")
        return self.names.index(name) + 1


class LoRALinear(nn.Module):
    """A base Linear/QuantizedLinear plus every attached adapter's A and B for it, stacked by slot."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array, bank: Bank):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b = a, b  # (slots, in, r_max), (slots, r_max, out); scale folded into b
        self._bank = bank

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        rows = self._bank.rows
        if rows is None:
            return y
        h = mx.gather_mm(x.astype(self.lora_a.dtype), self.lora_a, None, rows)  # (B, L, r): each row its own A
        return y + mx.gather_mm(h, self.lora_b, None, rows).astype(y.dtype)


def attach(model, adapters: list[Adapter], default: str | None = None, dtype: mx.Dtype | None = None) -> Bank:
    """Wrap every module some adapter targets; `default`: the adapter a PromptCache uses unless told."""
    if getattr(model, "adapters", None) is not None:
        raise AdapterError("this model already has adapters attached")
    if shard.group_of(model) is not None:
        raise AdapterError("adapters do not run split across ranks (--parallel)")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"two adapters are named {next(n for n in names if names.count(n) > 1)!r}")
    dtype = dtype or model.model.norm.weight.dtype
    bank = Bank(names, default)
    bank.adapters = {a.name: a for a in adapters}
    shapes = linear_shapes(model.config.text)
    for module in sorted({m for a in adapters for m in a.modules}):
        i, o = shapes[LINEAR.fullmatch(module).group(2)]
        r = max(a.modules[module].a.shape[1] for a in adapters if module in a.modules)
        A, B = np.zeros((len(adapters) + 1, i, r), np.float32), np.zeros((len(adapters) + 1, r, o), np.float32)
        for s, a in enumerate(adapters, 1):
            m = a.modules.get(module)
            if m is not None:
                k = m.a.shape[1]
                A[s, :, :k], B[s, :k, :] = np.asarray(m.a), np.asarray(m.b) * m.scale
        parent, leaf = module.rsplit(".", 1)
        parent = _get(model, parent)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), mx.array(A).astype(dtype), mx.array(B).astype(dtype), bank))
    mx.eval(model.parameters())
    model.adapters = bank  # a plain attribute: not a module, not a parameter
    return bank


def _get(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def select(model, names) -> None:
    """Set each row's adapter (a name, or None for the bare base) for the next forward pass."""
    bank = getattr(model, "adapters", None)
    if bank is None:
        if any(n is not None for n in names):
            raise AdapterError("this model has no adapters attached")
        return
    bank.rows = bank.slots(names)


def resolve(model, name: str | None) -> str | None:
    """The adapter a new cache binds to: `name`, else the model's default (None: the bare base)."""
    bank = getattr(model, "adapters", None)
    if bank is None:
        if name is not None:
            raise AdapterError(f"no adapter named {name!r}: this model has none attached")
        return None
    if name is None:
        return bank.default
    bank.slot(name)  # refuses an unknown name
    return name


def adapter_id(model, name: str | None) -> str:
    """What a saved prompt cache records of its adapter: the name and a digest of its weights ("" for none)."""
    if name is None:
        return ""
    a = model.adapters.adapters[name]
    if a.digest is None:
        h = hashlib.sha256()
        for module, m in sorted(a.modules.items()):
            h.update(module.encode())
            h.update(np.ascontiguousarray(np.asarray(m.b.astype(mx.float32) * m.scale)).tobytes())
            h.update(np.ascontiguousarray(np.asarray(m.a.astype(mx.float32))).tobytes())
        a.digest = h.hexdigest()[:16]
    return f"{name}:{a.digest}"


def load_adapters(model, adapter, dtype: mx.Dtype | None = None) -> Bank:
    """`adapter`: one path (it becomes the default) or {name: path} (none is the default)."""
    if isinstance(adapter, dict):
        adapters = [read_adapter(p, model.config, name=check_name(n)) for n, p in adapter.items()]
        return attach(model, adapters, None, dtype)
    a = read_adapter(adapter, model.config)
    return attach(model, [a], a.name, dtype)


__all__ = ["Adapter", "AdapterError", "LoRA", "LoRALinear", "attach", "load_adapters", "read_adapter", "select"]
