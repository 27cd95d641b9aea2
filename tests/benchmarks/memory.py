"""Peak memory and time of loading and converting, ours against mlx-lm on the same files, in one run.

    pip install mlx-lm            # the peer; not a dependency of gemma3-mlx
    python tests/benchmarks/memory.py --source /tmp/g270-f32       # the 270M and the 4B-shaped checkpoints
    python tests/benchmarks/memory.py --parts 270m --source /tmp/g270-f32
    python tests/benchmarks/memory.py --parts synthetic --layers 2  # 2 and 4 layers of the 4B shape
    python tests/benchmarks/memory.py --rtn ...                     # ours rounds to nearest like mlx-lm: faster

--source DIR keeps the float32 270M (converted from the packaged GGUF, about 35 s) in DIR and reuses it.

Every figure is the peak RSS of a fresh process doing one thing (VmHWM on Linux, ru_maxrss on macOS),
so it counts everything: Python, MLX, the tool's imports, mapped file pages, allocator caches. It is
also shown as a share of the weights' bytes on disk (/disk) and, for loads, of the loaded model's
parameter bytes (/loaded: on the CPU backend ours computes in float32, so a bfloat16 checkpoint
loads at twice its size on disk, and quantized matrices are expanded; mlx-lm keeps both). Cases:
  load          ours `gemma3_mlx.load(DIR)`, mlx-lm `mlx_lm.load(DIR)` (model and tokenizer);
  load model    ours `gemma3_mlx.load_model(DIR)`, mlx-lm `mlx_lm.utils.load_model(DIR)` (weights only);
  convert       ours `gemma3 convert DIR -o OUT --bits 4 --no-check`, mlx-lm
                `mlx_lm.convert(DIR, OUT, quantize=True, q_bits=4, q_group_size=64)`;
  convert+check ours `gemma3 convert DIR -o OUT --bits 4` (the quality check against the float source
                runs in the same process; mlx-lm has no such check).
  import        each tool's import alone: the floor under every other figure.
The synthetic checkpoints have Gemma 3 4B's shapes (hidden 2560, intermediate 10240, 8 heads, 4 KV
heads of 256, the 262,144-row embedding) in bfloat16 with random weights, with N and 2N layers: a
converter that works tensor by tensor peaks at the same memory for both.
Both tools run on MLX's CPU backend here; the converted models are not compared (see quantization.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE_4B = {"hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "vocab_size": 262144}


# ----------------------------------------------------------------------------------------- one process

def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def child(case: str, path: str, out: str | None, extra: list[str]) -> dict:
    """Run one case in this (fresh) process; the peak before the quality check too, when there is one."""
    t0 = time.perf_counter()
    seen = {}
    if case == "import-ours":
        import gemma3_mlx  # noqa: F401
    elif case == "import-mlx-lm":
        import mlx_lm  # noqa: F401
        import mlx_lm.utils  # noqa: F401
    elif case == "load-ours":
        import gemma3_mlx
        seen["loaded"] = _nbytes(gemma3_mlx.load(path)[0])
    elif case == "load-model-ours":
        import gemma3_mlx
        seen["loaded"] = _nbytes(gemma3_mlx.load_model(path))
    elif case == "load-mlx-lm":
        import mlx_lm
        seen["loaded"] = _nbytes(mlx_lm.load(path)[0])
    elif case == "load-model-mlx-lm":
        import mlx.core as mx
        from mlx_lm.utils import load_model
        model, _ = load_model(Path(path))
        mx.eval(model.parameters())
        seen["loaded"] = _nbytes(model)
    elif case == "convert-ours":
        import gemma3_mlx.convert.pipeline as pipeline
        from gemma3_mlx.cli.main import app

        check = pipeline.check_against_source

        def timed_check(*a, **k):  # what the same command peaks at without --check: everything before this
            seen["before_check"], seen["check_start"] = peak_rss(), time.perf_counter() - t0
            return check(*a, **k)

        pipeline.check_against_source = timed_check
        try:
            app(["convert", path, "-o", out, "--bits", "4", "--quiet", *extra])
        except SystemExit as e:
            if e.code:
                raise
    elif case == "convert-mlx-lm":
        import mlx_lm
        mlx_lm.convert(path, out, quantize=True, q_bits=4, q_group_size=64)
    else:
        raise SystemExit(f"unknown case {case}")
    return {"peak": peak_rss(), "seconds": time.perf_counter() - t0, **seen}


def _nbytes(model) -> int:
    """Bytes of a loaded model's parameters: what "the loaded model's bytes" means below."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def measure(case: str, path: Path, out: Path | None = None, extra: list[str] = (), timeout: float = 1800) -> dict:
    """`child` in a fresh Python process: {"peak": bytes, "seconds": s[, "before_check": bytes]}."""
    cmd = [sys.executable, __file__, "--child", case, str(path), str(out or ""), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        raise RuntimeError(f"{case} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


# ----------------------------------------------------------------------------------------- checkpoints

def synthetic_checkpoint(directory: Path, layers: int, shape: dict = SHAPE_4B, dtype: str = "bfloat16",
                         tokenizer: Path | None = None, seed: int = 0) -> Path:
    """A Hugging Face-style Gemma 3 text checkpoint of random weights with `shape` and `layers`,
    written one shard per layer (the embedding in its own), so writing it holds one layer at a time."""
    import mlx.core as mx

    d = Path(directory)
    d.mkdir(parents=True)
    D, I, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    H, KV, V = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **shape,
              "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": hd,
              "sliding_window": 1024, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
              "rope_local_base_freq": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
              # mlx-lm finds the global mask at cache[sliding_window_pattern - 1]: every 2nd layer global.
              "sliding_window_pattern": 2}
    (d / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer is not None:
        shutil.copy(tokenizer, d / "tokenizer.model")
    key = mx.random.key(seed)
    dt = getattr(mx, dtype)

    def rand(*s):
        nonlocal key
        key, k = mx.random.split(key)
        return (0.02 * mx.random.normal(s, key=k)).astype(dt)

    shards = [{"model.embed_tokens.weight": rand(V, D), "model.norm.weight": mx.zeros((D,), dt)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(H * hd, D), p + "self_attn.k_proj.weight": rand(KV * hd, D),
            p + "self_attn.v_proj.weight": rand(KV * hd, D), p + "self_attn.o_proj.weight": rand(D, H * hd),
            p + "self_attn.q_norm.weight": mx.zeros((hd,), dt), p + "self_attn.k_norm.weight": mx.zeros((hd,), dt),
            p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D), p + "mlp.down_proj.weight": rand(D, I),
            **{p + n + ".weight": mx.zeros((D,), dt) for n in ("input_layernorm", "post_attention_layernorm",
                                                              "pre_feedforward_layernorm", "post_feedforward_layernorm")}})
    weight_map = {}
    for j, tensors in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(d / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        shards[j] = None  # written: let it go
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# ----------------------------------------------------------------------------------------- report

def run_cases(label: str, src: Path, tmp: Path, peers: bool, check: bool = True, rtn: bool = False) -> list[tuple]:
    w = weight_bytes(src)
    rows = []

    def row(tool, case, r):
        loaded = f"{100 * r['peak'] / r['loaded']:6.0f}%" if "loaded" in r else ""
        rows.append((label, tool, case, r["peak"], 100 * r["peak"] / w, r["seconds"]))
        print(f"{label:22s} {tool:7s} {case:14s} {r['peak'] / 1e6:8.0f} MB {100 * r['peak'] / w:6.0f}% "
              f"{loaded:>7s} {r['seconds']:7.1f} s", flush=True)

    for case in ("load", "load-model"):
        row("ours", case, measure(f"{case}-ours", src))
        if peers:
            row("mlx-lm", case, measure(f"{case}-mlx-lm", src))
    for ours in (True, False) if peers else (True,):
        out = tmp / f"{label}-{'ours' if ours else 'mlx-lm'}"
        shutil.rmtree(out, ignore_errors=True)
        if ours:
            r = measure("convert-ours", src, out, ([] if check else ["--no-check"]) + (["--rtn"] if rtn else []))
            if check:
                row("ours", "convert", {"peak": r["before_check"], "seconds": r["check_start"]})
                row("ours", "convert+check", r)
            else:
                row("ours", "convert", r)
        else:
            row("mlx-lm", "convert", measure("convert-mlx-lm", src, out))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--parts", default="270m,synthetic", help="270m, synthetic (comma separated)")
    ap.add_argument("--source", help="the float32 270M directory (made and kept here if missing)")
    ap.add_argument("--layers", type=int, default=2, help="synthetic: N and 2N layers (default 2)")
    ap.add_argument("--no-peer", action="store_true", help="skip mlx-lm")
    ap.add_argument("--rtn", action="store_true", help="ours rounds to nearest, as mlx-lm does (faster; the same memory)")
    args, rest = ap.parse_known_args()
    if args.child:
        case, path, out = (args.child + ["", ""])[:3]
        print(json.dumps(child(case, path, out or None, args.child[3:] + rest)))
        return
    peers = not args.no_peer
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as t:
        tmp = Path(t)
        print(f"{'checkpoint':22s} {'tool':7s} {'case':14s} {'peak RSS':>11s} {'/disk':>7s} {'/loaded':>7s} {'time':>9s}")
        for tool in ("ours", "mlx-lm") if peers else ("ours",):
            r = measure(f"import-{tool}", Path("."))
            print(f"{'(none)':22s} {tool:7s} {'import':14s} {r['peak'] / 1e6:8.0f} MB {'':15s} {r['seconds']:7.1f} s")
        parts = args.parts.split(",")
        src = None
        if "270m" in parts or peers:
            sys.path.insert(0, str(Path(__file__).parent))
            from speed import source_270m  # the same float32 270M conversion as the speed benchmark

            src = source_270m(args.source, tmp)
        if "270m" in parts:
            run_cases("270M float32", src, tmp, peers, rtn=args.rtn)
        if "synthetic" in parts:
            tok = src / "tokenizer.model" if src is not None else None  # mlx-lm's convert needs a tokenizer
            for n in (args.layers, 2 * args.layers):
                d = synthetic_checkpoint(tmp / f"syn{n}", n, tokenizer=tok)
                run_cases(f"4B-shaped x{n} layers", d, tmp, peers, rtn=args.rtn)
                shutil.rmtree(d)


if __name__ == "__main__":
    main()
