"""Load a converted (or Hugging Face) Gemma 3 directory: `load(path) -> (model, tokenizer)`.

Weights are loaded strictly (every parameter present, no strays, shapes checked) from
safetensors only, cast to the compute dtype: float32 on the CPU backend, bfloat16 on
Metal/CUDA. It never downloads: resolving model names is models.py's job.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import mlx.nn as nn

from ._signals import sigint_to_main_thread
from .adapters import load_adapters
from .config import ModelConfig, instruction_tuned_from_name
from .errors import ConfigError, ModelFileError
from .files import read_json
from .model import Model
from .packing import unpack
from .safetensors_io import SafetensorsFile, checkpoint_files
from .tokenizer import Tokenizer
from .weights import checkpoint_weights

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
VISION = ("vision_tower.", "multi_modal_projector.")  # names of the vision tower and projector weights


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (bfloat16 matmuls are ~8x slower there), bfloat16 on GPUs.

    Never float16: Gemma's activations overflow it.
    """
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def quantize_like(model: Model, settings: dict, weights: dict) -> None:
    """Swap in quantized layers wherever the checkpoint holds `<module>.scales`.

    `settings` is config.json's "quantization": default `bits`/`group_size`, and per-module
    overrides keyed by module path (mixed-precision recipes, GGUF blocks kept at their own bits).
    """

    def params(path, module):
        if f"{path}.scales" not in weights:
            return False
        group_size, bits, mode = _settings(settings, path)
        return {"group_size": group_size, "bits": bits, "mode": mode}

    nn.quantize(model, class_predicate=params)


def _settings(settings: dict, module: str) -> tuple[int, int, str]:
    s = settings.get(module, settings)
    if not isinstance(s, dict) or "bits" not in s or "group_size" not in s:
        raise ConfigError(f"config.json: quantization settings for {module} are missing")
    return int(s["group_size"]), int(s["bits"]), s.get("mode", "affine")


def materialise(weights: dict, settings: dict | None, dtype: mx.Dtype, expand: bool) -> dict:
    """Evaluate lazily read weights one tensor at a time, in place of the lazy ones: floats cast
    to `dtype` (the vision tower to float32), quantized matrices expanded to `dtype` if `expand`.

    One at a time, each lazy array popped from `weights` (emptied) before it is evaluated, so the
    peak is the loaded model plus one tensor's working set: never the file's bytes beside the cast
    or expanded copy."""
    out = {}
    for key in [k for k in weights if k.endswith(".scales")] if expand else []:
        module = key[: -len(".scales")]
        w, scales, biases = weights.pop(f"{module}.weight"), weights.pop(key), weights.pop(f"{module}.biases", None)
        to = mx.float32 if module.startswith(VISION) else dtype  # an 8-bit tower still computes in float32
        scales, biases = scales.astype(to), None if biases is None else biases.astype(to)
        out[f"{module}.weight"] = _expand(w, scales, biases, *_settings(settings or {}, module), to)
        mx.eval(out[f"{module}.weight"])
    for name in list(weights):
        w = weights.pop(name)
        if mx.issubdtype(w.dtype, mx.floating):  # the vision tower runs in float32, like the reference
            w = w.astype(mx.float32 if name.startswith(VISION) else dtype)
        out[name] = w
        mx.eval(w)
    return out


def _expand(w, scales, biases, group_size: int, bits: int, mode: str, dtype, rows: int | None = None) -> mx.array:
    """mx.dequantize, a block of `rows` at a time (default: 32 MB of output) into one preallocated
    output: expanding a whole matrix at once peaks at twice its float size (measured on the CPU)."""
    odd = bits in (3, 5, 6) and mode == "affine" and mx.default_device() == mx.cpu
    out = mx.zeros((*w.shape[:-1], scales.shape[-1] * group_size), dtype)
    rows = rows or max(1, (32 << 20) // max(1, out[0].nbytes))
    for i in range(0, out.shape[0], rows):
        j = min(i + rows, out.shape[0])
        b = None if biases is None else biases[i:j]
        if odd:
            out[i:j] = _odd_bits_block(w[i:j], scales[i:j], b, group_size, bits, dtype)
        else:
            out[i:j] = mx.dequantize(w[i:j], scales[i:j], b, group_size=group_size, bits=bits, mode=mode).astype(dtype)
        mx.eval(out)  # written in place: the output's buffer is reused, not copied
    return out


def _dequantize_odd_bits(w, scales, biases, group_size: int, bits: int, dtype, rows: int = 8192) -> mx.array:
    """mx.dequantize, exactly, 4-5x faster for 3/5/6 bits on the CPU backend (whose kernel for
    those widths takes ~6 s for the 270M's embedding): unpack with numpy, a block of rows at a time."""
    return _expand(w, scales, biases, group_size, bits, "affine", dtype, rows=rows)


def _odd_bits_block(w, scales, biases, group_size: int, bits: int, dtype) -> mx.array:
    q = mx.array(unpack(np.asarray(w), bits))
    q = q.reshape(q.shape[0], -1, group_size).astype(mx.float32)
    x = q * scales[:, :, None].astype(mx.float32) + biases[:, :, None].astype(mx.float32)
    return x.reshape(q.shape[0], -1).astype(dtype)


def load_config(path: Path) -> ModelConfig:
    path = Path(path)
    f = path / "config.json"
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ModelFileError(f"{path}: not a model directory")
    if not f.exists():
        raise ConfigError(f"{path}: no config.json (is this a model directory?)")
    d = read_json(f, 1 << 20, "a config.json", ConfigError)  # bounded: a config is a few KB
    if isinstance(d, dict) and d.get("instruction_tuned") is None:  # converted before the key was recorded
        d["instruction_tuned"] = instruction_tuned_from_name(path.resolve().name)
    return ModelConfig.from_dict(d)


@dataclass(frozen=True)
class Checkpoint:
    """A model directory as read once: its config.json and each weight file's header (parsed and checked).
    A load hands it along (the cache's damage check, the memory check, the loader) instead of each part
    reading the directory again."""

    path: Path
    config: ModelConfig
    files: tuple[SafetensorsFile, ...]

    @classmethod
    def read(cls, path: str | Path) -> "Checkpoint":
        """The directory's config and headers. The last directory read is remembered while its files stay
        as they were (names, sizes, modification times): the cache's damage check (models.problem) and
        the load right after it read the directory once."""
        path = Path(path)
        key = _signature(path)
        if key is not None and _LAST.get(key) is not None:
            return _LAST[key]
        config = load_config(path)
        checkpoint = cls(path, config, tuple(SafetensorsFile(f) for f in checkpoint_files(path)))
        _LAST.clear()
        if key is not None:
            _LAST[key] = checkpoint
        return checkpoint


_LAST: dict = {}  # the last Checkpoint read, under its directory's signature


def _signature(path: Path):
    """What a directory's config and headers depend on: each json/safetensors file's name, size and
    modification time (None when it cannot be listed)."""
    try:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
        return str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return None


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, dequantize: bool | None = None, *,
               config: ModelConfig | None = None, plan=None, files=None) -> Model:
    """Build the model of a directory. Quantized weights stay quantized on GPUs; on the CPU
    backend (`dequantize=None`) they are expanded to the compute dtype, because MLX's CPU
    quantized kernels run prompts ~16x slower than float matmuls with BLAS (decode about the same:
    `tests/benchmarks/speed.py --parts kept`, 2026-12-06).
    `config`, `files`: the directory's config.json and weight files' headers when the caller has read them
    already (a Checkpoint, as `load` has). `plan`: a shard.Plan: this rank reads only its own tensors and slices, and the model is split to match."""
    path = Path(path)
    config = config or load_config(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype())
    if dtype == mx.float16:
        raise ValueError("float16 compute is not supported: Gemma 3 activations overflow it")
    model = Model(config)  # its random initial weights are lazy: never computed, replaced below
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    weights = read_weights(path, config, dtype, dequantize, *((plan.keep, plan.take) if plan else ()), files=files)
    quantize = (lambda m: quantize_like(m, config.quantization, weights)) if config.quantization and not dequantize else None
    if plan is not None:
        plan.apply(model, quantize)  # split the model as the weights were, quantized layers included
    elif quantize:
        quantize(model)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelFileError(f"{path}: weights do not match the config ({' '.join(str(e).split())})") from None
    mx.eval(model.parameters())
    return model


def read_weights(path: Path, config: ModelConfig, dtype: mx.Dtype, dequantize: bool,
                 select: Callable[[str], bool] | None = None, take=None, files=None) -> dict[str, mx.array]:
    """A directory's weights under MLX names (those `select` keeps, each cut down by `take(name, w)`
    when given: a rank's slice, shard.Plan), materialised one at a time. `files`: its headers, if read."""
    files = files or [SafetensorsFile(f) for f in checkpoint_files(Path(path))]
    lazy = {n: take(n, w) if take else w for n, w in checkpoint_weights(files, vision=config.vision is not None)
            if not select or select(n)}
    with sigint_to_main_thread():  # the first lazy load starts MLX's reading threads: they leave Ctrl-C alone
        return materialise(lazy, config.quantization, dtype, expand=bool(config.quantization) and dequantize)


def load_tokenizer(path: str | Path, *, config: ModelConfig | None = None) -> Tokenizer | None:
    """The directory's tokenizer.model (None, with a warning, if it has none). `config`: as in load_model."""
    f = Path(path) / "tokenizer.model"
    if not f.exists():
        warnings.warn(f"{path}: no tokenizer.model; token ids only", stacklevel=2)
        return None
    c = config or load_config(Path(path))
    image_ids = {} if c.vision is None else {"boi_token_index": c.boi_token_index, "eoi_token_index": c.eoi_token_index,
                                             "image_token_index": c.image_token_index}
    tok = Tokenizer(f, **image_ids)
    if tok.vocab_size > c.text.vocab_size:  # its ids would look up embedding rows that do not exist
        raise ModelFileError(f"{f}: {tok.vocab_size:,} pieces, but the model's embedding has only "
                             f"{c.text.vocab_size:,} rows (the tokenizer belongs to another model)")
    return tok


def load(path: str | Path | Checkpoint, dtype: str | mx.Dtype | None = None, dequantize: bool | None = None,
         adapter: str | Path | dict | None = None) -> tuple:
    """Load a model directory (or a Checkpoint read from one: nothing is read twice). `dtype` overrides the compute dtype ("float32" or "bfloat16");
    `dequantize` overrides whether quantized weights are expanded (default: on the CPU backend).
    `adapter`: a LoRA adapter directory (PEFT or mlx-lm) the model then runs, unmerged; or
    {name: directory} for several, which requests choose by name (adapters.py)."""
    c = path if isinstance(path, Checkpoint) else Checkpoint.read(path)  # read once, for both
    model = load_model(c.path, dtype, dequantize, config=c.config, files=c.files)
    if adapter is not None:
        load_adapters(model, adapter)
    return model, load_tokenizer(c.path, config=c.config)


__all__ = ["load", "load_model", "load_tokenizer", "load_config", "Checkpoint"]
