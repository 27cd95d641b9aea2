"""`convert(source, out)`: a Hugging Face directory, hub id or GGUF file -> an MLX model directory.

Tensor by tensor into an atomic output directory (writer.py streams each to disk), so peak
memory stays near the largest tensor's working set, whatever the model's size (the quality check
too: quality.py walks the layers). What each tensor becomes:
- GGUF, no --bits/--recipe: blocks MLX can express exactly keep their own bits; Q6_K/Q3_K/Q2_K
  are requantized at the nearest MLX bits that lose least; float tensors keep their type.
- `bits`: every matrix (the tied embedding included) at `bits`, like mlx-lm's default.
- `recipe`: mixed precision from RECIPES (measured in tests/benchmarks/sensitivity.py).
- otherwise float, in `dtype`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..adapters import read_adapter
from ..errors import ConversionError
from .calibrate import calibrate, peak_rss_mb
from .quality import check_against_source
from .quantize import quantize
from .sources import open_source
from .tensors import FloatTensor, QuantizedTensor
from .writer import ShardWriter, atomic_directory, check_output, write_config

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)
# GGUF block types with 16-value sub-blocks (not expressible in MLX groups) -> bits that lose least.
GGUF_FALLBACK_BITS = {"Q6_K": 8, "Q3_K": 4, "Q2_K": 3}
GGUF_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Mixed-precision recipes: (base bits, group size, {name fragment: bits}); the first fragment
# found in a tensor's name wins. Chosen from per-class sensitivity measured on the 270M
# (tests/benchmarks/sensitivity.py, KL vs float on the built-in text / a held-out text):
# all 4-bit: 4.51 bpw, KL 0.277. v_proj is the most valuable per byte; the embedding at 4 bits
# costs 0.071 alone, the decoder matrices together three times that.
RECIPES = {
    "small": (6, 64, {"embed_tokens": 4, "v_proj": 8, "k_proj": 8}),  # 5.30 bpw, KL 0.082 / 0.093
    "balanced": (5, 64, {"v_proj": 8}),  # 5.54 bpw, KL 0.045 / 0.053
    "quality": (6, 64, {"embed_tokens": 5}),  # 5.88 bpw, KL 0.032 / 0.029
}


@dataclass
class ConversionReport:
    out: Path
    n_params: int
    n_bytes: int
    formats: Counter = field(default_factory=Counter)  # "Q4_K (exact) -> 4-bit g32": tensor count
    quality: dict | None = None  # {"kl": ..., "top1": ..., "tokens": ...} against the float source
    calibration: dict | None = None  # calibrate.Calibration.summary() when calibrated

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / max(self.n_params, 1)


def is_matrix(name: str, shape) -> bool:
    """Projection and embedding matrices are quantized; norms and other vectors never are."""
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return False  # the vision tower stays at the checkpoint's precision
    return len(shape) == 2 and name.endswith(("_proj.weight", "embed_tokens.weight"))


def is_vision_matrix(name: str, shape) -> bool:
    """The vision tower's linear layers (attention and MLP); never its patch conv or the projector."""
    return (name.startswith("vision_tower.") and len(shape) == 2
            and name.endswith(("_proj.weight", "fc1.weight", "fc2.weight")))


def plan(name: str, bits: int | None, group_size: int, recipe: str | None) -> tuple[int, int] | None:
    """(bits, group_size) for a matrix, or None to keep it float."""
    if recipe is not None:
        base, gs, overrides = RECIPES[recipe]
        return next((b for frag, b in overrides.items() if frag in name), base), gs
    return (bits, group_size) if bits is not None else None


def validate(bits, group_size, recipe, dtype) -> None:
    if bits is not None and bits not in BITS:
        raise ConversionError(f"unsupported --bits {bits} (choose from {', '.join(map(str, BITS))})")
    if group_size not in GROUP_SIZES:
        raise ConversionError(f"unsupported --group-size {group_size} (choose 32, 64 or 128)")
    if recipe is not None and recipe not in RECIPES:
        raise ConversionError(f"unknown --recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    if bits is not None and recipe is not None:
        raise ConversionError("give --bits or --recipe, not both")
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"unsupported --dtype {dtype!r} (choose float32 or bfloat16)")


def _store_scales(a, exact: bool) -> mx.array:
    """float16 where it is exact (GGUF Q8_0/Q4_0/Q5_0 scales are) or, for float sources, where it
    is finite (its rounding measured no KL change); else float32 (K-quant products, huge ranges)."""
    a = np.asarray(a, dtype=np.float32)
    h = a.astype(np.float16)
    ok = np.array_equal(h.astype(np.float32), a) if exact else bool(np.isfinite(h).all())
    return mx.array(h if ok else a)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    bits: int | None = None,
    group_size: int = 64,
    recipe: str | None = None,
    method: str = "search",
    force: bool = False,
    check: bool = False,
    quantize_vision: bool = False,
    progress: Callable[[int, int], None] | None = None,
    calibration: dict | None = None,
    adapter: str | Path | None = None,
) -> ConversionReport:
    """Convert `source` into the MLX model directory `out`. Never modifies `source`.

    `calibration`: calibrate.calibrate's keywords (data, tokens, seed, progress) to round every
    quantized text matrix with its input statistics (GPTQ); {} for the defaults. `adapter`: a LoRA
    adapter directory (PEFT or mlx-lm) merged into the float weights before quantizing; the quality
    check then compares against the merged float model."""
    validate(bits, group_size, recipe, dtype)
    if calibration is not None and bits is None and recipe is None:
        raise ConversionError("--calibrate needs --bits or --recipe")
    out = Path(out).expanduser()
    check_output(out, force, keep=[source])  # before a download or a GGUF is read
    src = open_source(source)
    is_gguf = src.path.is_file()
    native = is_gguf and bits is None and recipe is None and dtype is None
    config = src.config()
    lora = read_adapter(adapter, config) if adapter is not None else None
    if lora is not None and calibration is not None:
        raise ConversionError("--calibrate with --adapter is not supported (calibration runs the unmerged source)")
    native = native and lora is None  # a GGUF's blocks are expanded to float to take the adapter
    tokenizer = src.tokenizer_model()
    if tokenizer is None:
        warnings.warn(f"{source}: no tokenizer.model in the source; the converted model takes token ids only", stacklevel=2)
    total = src.tensor_count()
    report = ConversionReport(out, 0, 0)
    settings: dict[str, dict] = {}
    calib = calibrate(src, **calibration) if calibration is not None else None
    if calib is not None:
        report.calibration = calib.summary()

    with atomic_directory(out, force=force, keep=[src.path]) as tmp:
        writer = ShardWriter(tmp)
        for i, (name, t) in enumerate(src.tensors(native=native)):
            if isinstance(t, QuantizedTensor):
                q, requantized = t, False
            else:
                origin, t = (t.origin, t.value) if isinstance(t, FloatTensor) else ("float", t)
                kept, t = t, _merge(lora, name, t)  # the source's own type still decides a float's storage
                spec = _spec(name, t.shape, origin, bits, group_size, recipe, native, quantize_vision)
                if spec is None:
                    target = dtype or _float_target(name, kept, origin, is_gguf)
                    w = mx.array(t).astype(DTYPES[target])
                    writer.add(name, w)
                    report.n_params += w.size
                    report.formats[f"{origin} -> {target}"] += 1
                    _tick(progress, i, total)
                    continue
                try:
                    done = calib and calib.quantize(name, t, spec[0], spec[1])
                    wq, scales, biases = done or quantize(t, spec[0], spec[1], method=method)
                except ValueError as e:
                    raise ConversionError(f"{name}: {e}") from None
                q, requantized = QuantizedTensor(wq, scales, biases, spec[0], spec[1], origin), native
            module = name.rsplit(".", 1)[0]
            writer.add(f"{module}.weight", q.weight)
            writer.add(f"{module}.scales", _store_scales(q.scales, exact=native))
            writer.add(f"{module}.biases", _store_scales(q.biases, exact=native))
            settings[module] = {"bits": q.bits, "group_size": q.group_size}
            report.n_params += q.weight.size * 32 // q.bits
            report.formats[f"{q.origin} -> {q.bits}-bit g{q.group_size}" + (" requantized" if requantized else "")] += 1
            _tick(progress, i, total)
        writer.close()
        report.n_bytes = writer.total_bytes
        if settings:
            config = _with_quantization(config, settings)
        write_config(tmp, config.to_dict())
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer)
        if check:
            report.quality = check_against_source(tmp, src, adapter=lora)
            if not np.isfinite(report.quality["kl"]):  # nothing is published: the block fails
                raise ConversionError(f"the converted model's outputs are not finite (KL {report.quality['kl']}): "
                                      "the conversion is broken, nothing was written")
    if calib is not None:
        calib.close()
        report.calibration["peak_rss_mb"] = peak_rss_mb()  # of the whole conversion
    return report


def _merge(lora, name: str, t):
    """W + scale * B @ A, in float32, for a matrix the adapter targets; `t` itself otherwise."""
    delta = lora.delta(name.removesuffix(".weight")) if lora is not None and name.endswith(".weight") else None
    return t if delta is None else mx.array(t).astype(mx.float32) + mx.array(delta)


def _tick(progress, i, total):
    if progress:
        progress(i + 1, total)


def _spec(name, shape, origin, bits, group_size, recipe, native, quantize_vision) -> tuple[int, int] | None:
    """(bits, group_size) a float tensor is quantized at, or None to keep it float."""
    if quantize_vision and is_vision_matrix(name, shape):
        return 8, 32  # optional: the tower is small next to the text model
    if not is_matrix(name, shape):
        return None
    if native:  # a GGUF at its own bits: only blocks MLX cannot express come here as floats
        return (GGUF_FALLBACK_BITS[origin], 32) if origin in GGUF_FALLBACK_BITS else None
    spec = plan(name, bits, group_size, recipe)
    if spec and recipe is not None and shape[-1] % spec[1]:
        # Recipes name a group size for real models; odd sizes take the largest that fits.
        spec = (spec[0], next((g for g in reversed(GROUP_SIZES) if shape[-1] % g == 0), spec[1]))
    return spec


def _float_target(name, t, origin, is_gguf) -> str:
    """Storage type of a tensor kept float: a GGUF's own type (norms float32), else the source's."""
    if is_gguf:
        return GGUF_FLOAT.get(origin, "float32") if is_matrix(name, t.shape) else "float32"
    return {mx.float32: "float32", mx.float16: "float16"}.get(t.dtype, "bfloat16")


def _with_quantization(config, settings: dict[str, dict]):
    """Record the most common (bits, group_size) as the default and the rest per module."""
    common = Counter((s["bits"], s["group_size"]) for s in settings.values()).most_common(1)[0][0]
    q = {"mode": "affine", "bits": common[0], "group_size": common[1]}
    q.update({m: s for m, s in settings.items() if (s["bits"], s["group_size"]) != common})
    return dataclasses.replace(config, quantization=q)
