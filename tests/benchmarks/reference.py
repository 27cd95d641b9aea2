"""The largest differences from the recorded transformers references, printed: the figures the README
quotes beside the tests' bounds (the tests assert the bounds; this prints what is measured now).

    python tests/benchmarks/reference.py --source /tmp/g270-f32     # the float32 270M (speed.py's --source)
    python tests/benchmarks/reference.py --parts tiny,vision         # the tiny fixtures only (seconds)

Parts (`--parts`, comma separated; default all):
  tiny     tiny random Gemma 3 (both config schemas), full forward against transformers' float32 logits
           (test_model.py), and token by token / chunked prefill (1, W-1, W, W+1, 3W) against the full forward.
  vision   the tiny Gemma3ForConditionalGeneration: one image, two images, pan & scan crops, from the
           transformers checkpoint and from our float32 conversion (test_vlm.py).
  real     the 270M GGUF in float32 against transformers float32 on the 5 recorded prompts: top-1 at every
           position, largest difference on the recorded top-64 logits and on the log-normalizer (test_270m.py).
  long     the 5,088-token prompt prefilled in chunks of 256 against transformers' top-64 at the recorded
           positions (test_long_context.py), and the quantized global KV (8 and 4 bits) against the float
           KV over positions 768-999 of the first 1,000 tokens: KL and top-1.
"""

from __future__ import annotations

import gemma3_mlx  # noqa: I001  first: preloads OpenBLAS before mlx.core is imported

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from test_long_context import chunked_logits  # noqa: E402  the prefill the test bounds, the head only at the positions

from gemma3_mlx import forward  # noqa: E402
from gemma3_mlx.convert import convert  # noqa: E402
from gemma3_mlx.loader import load_model  # noqa: E402


def refs(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def tiny(tmp: Path) -> None:
    for name in ("tiny_v5", "tiny_v4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(FIXTURES / name, tmp / name, dtype="float32")
        model = load_model(tmp / name, dtype="float32")
        fx = mx.load(str(FIXTURES / name / "logits.safetensors"))
        ids, ref = fx["input_ids"], np.array(fx["logits"])
        full = np.array(model(ids))
        w = model.config.text.sliding_window
        cache = model.make_cache()
        steps = np.concatenate([np.array(model(ids[:, i : i + 1], cache)) for i in range(ids.shape[1])], axis=1)
        worst_chunk = 0.0
        for chunk in (1, w - 1, w, w + 1, 3 * w):
            cache = model.make_cache()
            parts = [np.array(model(ids[:, s : s + chunk], cache)) for s in range(0, ids.shape[1], chunk)]
            worst_chunk = max(worst_chunk, float(np.abs(np.concatenate(parts, axis=1) - full).max()))
        print(f"tiny {name}: {ids.shape[1]} tokens, window {w}: full forward vs transformers {np.abs(full - ref).max():.1e}; "
              f"token by token vs full {np.abs(steps - full).max():.1e}; chunked (1, W-1, W, W+1, 3W) vs full {worst_chunk:.1e}", flush=True)


def vision(tmp: Path) -> None:
    vlm = FIXTURES / "tiny_vlm"
    ref = refs(vlm / "ref.safetensors")
    prompts = json.loads((vlm / "prompts.json").read_text())["prompts"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in the tiny checkpoint
        convert(vlm, tmp / "vlm-f32", dtype="float32")
    worst = 0.0
    for src in (vlm, tmp / "vlm-f32"):
        model = load_model(src, dtype="float32")
        for name in ("one_image", "two_images", "pan_and_scan"):
            ids, pixels = mx.array(ref[f"{name}.input_ids"]), mx.array(ref["pixels_nhwc"][prompts[name]["images"]])
            d = float(np.abs(np.array(forward.logits(model, ids, pixels=pixels)) - ref[f"{name}.logits"]).max())
            worst = max(worst, d)
            print(f"vision {'transformers checkpoint' if src == vlm else 'our float32 conversion'}, {name}: "
                  f"largest logit difference {d:.1e}", flush=True)
    print(f"vision: largest logit difference over all {worst:.1e}", flush=True)


def real(model) -> None:
    ref = refs(FIXTURES / "ref_270m.safetensors")
    meta = json.loads((FIXTURES / "ref_270m.json").read_text())
    worst, worst_lse, top1 = 0.0, 0.0, True
    for i in range(len(meta["prompts"])):
        logits = np.array(model(mx.array(ref[f"p{i}.ids"])[None])[0])
        top = ref[f"p{i}.top_ids"].astype(np.int64)
        top1 &= bool((logits.argmax(-1) == top[:, 0]).all())
        worst = max(worst, float(np.abs(np.take_along_axis(logits, top, -1) - ref[f"p{i}.top_logits"]).max()))
        m = logits.max(-1)
        lse = np.log(np.exp(logits - m[:, None]).sum(-1)) + m
        worst_lse = max(worst_lse, float(np.abs(lse - ref[f"p{i}.lse"]).max()))
    print(f"real 270M float32, {len(meta['prompts'])} prompts: top-1 equal at every position: {top1}; largest top-64 "
          f"logit difference {worst:.1e}, log-normalizer {worst_lse:.1e}", flush=True)


LAST = np.arange(768, 1000)  # positions whose attention reads >= 768 quantized global keys (as test_long_context)


def long(model) -> None:
    ref = refs(FIXTURES / "ref_270m_long.safetensors")
    ids, pos, top = ref["ids"].tolist(), ref["positions"].astype(np.int64), ref["top_ids"].astype(np.int64)
    sel = chunked_logits(model, ids, 256, model.make_cache(), pos)
    d = float(np.abs(np.take_along_axis(sel, top, -1) - ref["top_logits"]).max())
    print(f"long: {len(ids)} tokens in chunks of 256, {len(pos)} positions: top-1 equal: "
          f"{bool((sel.argmax(-1) == top[:, 0]).all())}; largest logit difference {d:.1e}", flush=True)

    def logp(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    first = ids[:1000]
    lp = logp(chunked_logits(model, first, 256, model.make_cache(), LAST))
    for bits in (8, 4):
        lq = logp(chunked_logits(model, first, 256, model.make_cache(kv_bits=bits), LAST))
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
        print(f"long: global KV at {bits} bits, positions {LAST[0]}-{LAST[-1]} of 1,000 tokens: KL mean {kl.mean():.4f}, "
              f"top-1 {100 * (lp.argmax(-1) == lq.argmax(-1)).mean():.1f}%", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="tiny,vision,real,long")
    ap.add_argument("--source", help="float32 270M directory to reuse; converted there first if it holds no model")
    args = ap.parse_args()
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    print(f"gemma3-mlx, mlx {mx.__version__}, device {mx.default_device()}, parts {','.join(parts)}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "tiny" in parts:
            tiny(tmp)
        if "vision" in parts:
            vision(tmp)
        if "real" in parts or "long" in parts:
            from speed import source_270m

            model = load_model(source_270m(args.source, tmp), dtype="float32")
            if "real" in parts:
                real(model)
            if "long" in parts:
                long(model)
    print(f"wall time {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
