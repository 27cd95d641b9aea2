"""Speculative decoding on the real Gemma 3 270M: prompt lookup and a draft model, against plain decoding
and against mlx-lm's speculative decoding, measured in one run, as ratios.

    pip install mlx-lm            # the peer; not a dependency of gemma3-mlx
    python tests/benchmarks/speculative.py --source /tmp/g270-f32            # all five parts (32 min on 2 busy cores)
    python tests/benchmarks/speculative.py --quick --source /tmp/g270-f32    # smoke test: short, one round (4 min)
    python tests/benchmarks/speculative.py --parts edit,story --source /tmp/g270-f32

--source DIR keeps the float32 270M conversion (about 35 s) in DIR and reuses it on later runs. The draft
model is the default 4-bit 270M (`gemma3_mlx.resolve(None)`, converted into the cache once).

Parts (`--parts`, comma separated; default all):
  edit    (1) prompt lookup on a code-edit prompt (a code block, an instruction, then the start of the same
          block with one change): the answer copies from the prompt. Goal: >= 1.8x plain tokens/s.
  story   (2) prompt lookup on open-ended text (a story opening). Goal: at most 3% slower than plain
          (the engine switches speculation off when it does not pay).
  draft   (3) the 4-bit 270M drafting for the float32 270M, on both prompts: expanded to float32 at load
          (the CPU default, so draft and target cost the same here and it cannot pay), and kept quantized
          (`dequantize=False`) on the prompts named by --kept-draft (default: the short story prompt).
          Reports whether the engine switched speculation off.
  mlx-lm  (4) mlx-lm's `speculative_generate_step` with the same draft weights, on both prompts (prompt +
          generated < 512 tokens: inside one sliding window, where its rollback is correct), against its
          own `generate_step`; whether its greedy output equals its plain output.
  metal   (5) arithmetic, printed as text: bytes read per token for a 270M draft and 12B / 27B targets at
          4 bits, and what tokens per target step give when decoding is bound by memory bandwidth.

How each variant is driven (nothing of either tool's loop is rewritten here), all greedy, no stop tokens:
  ours: `gemma3_mlx.stream_generate(model, tok, ids, max_tokens=N, stop_ids=())`, plus `prompt_lookup=True`
  or `draft_model=<model>`; the last piece's `.stats` gives acceptance, tokens per target step, etc.
  mlx-lm: `mlx_lm.generate.generate_step(mx.array(ids), model, max_tokens=N)` and
  `speculative_generate_step(mx.array(ids), model, draft, num_draft_tokens=K, max_tokens=N)`, models loaded
  from the same directories with `mlx_lm.utils.load_model` (token ids in, so no tokenizer is needed). Its
  draft is used as mlx-lm loads it (quantized kernels; scales cast to float32 as ours are) and expanded with
  its own `mlx_lm.utils.dequantize_model` (float32), matching our two draft variants.
  Timed from outside, identically: decode tok/s = (N - 1) / (time of token N - P), times from the call, where
  P is the time to the first token of the same tool's plain runs (its prefill of the target). Speculative runs
  are charged everything after the target's prefill: the draft's own prefill and every round. (Measuring from
  a speculative run's own first token would flatter ours: it reports its first token together with the first
  round's tokens.) Ours also prints its own Stats.generation_tps, timed inside the engine.

Every variant is warmed up first (a few tokens of the same prompt), rounds interleave the variants (the order
reversed on odd rounds), and the best round of each is kept. Absolute numbers are only comparable within one
run: the machine is shared. Everything computes in float32 on the backend MLX picks (the CPU here, with the
OpenBLAS that gemma3_mlx preloads, which mlx-lm then uses too).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gemma3_mlx  # first: loads OpenBLAS for MLX's CPU backend (mlx-lm then benefits too)
import mlx.core as mx

PARTS = ("edit", "story", "draft", "mlx-lm", "metal")
WINDOW = 512  # the 270M's sliding window: mlx-lm's speculative rollback is only right inside it

CODE = '''import json
from dataclasses import dataclass


@dataclass
class Interval:
    start: int
    end: int


def merge_intervals(intervals):
    """Merge overlapping intervals and return them sorted by start."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda iv: iv.start)
    merged = [Interval(intervals[0].start, intervals[0].end)]
    for iv in intervals[1:]:
        last = merged[-1]
        if iv.start <= last.end:
            last.end = max(last.end, iv.end)
        else:
            merged.append(Interval(iv.start, iv.end))
    return merged


def total_covered(intervals):
    """Total length covered by a list of intervals."""
    return sum(iv.end - iv.start for iv in merge_intervals(intervals))


def load_intervals(path):
    """Read intervals from a JSON file holding a list of [start, end] pairs."""
    with open(path) as f:
        return [Interval(start, end) for start, end in json.load(f)]
'''
EDIT_PROMPT = ("Rename the function merge_intervals to merge_ranges everywhere, leaving everything else "
               "unchanged.\n\nBefore:\n```python\n" + CODE + "```\n\nAfter:\n```python\n"
               + CODE.split("def merge_intervals")[0] + "def merge_ranges(intervals):\n")
STORY_PROMPT = ("The lighthouse keeper had not seen a ship in eleven years when the storm brought one to "
                "his rocks. It came out of the rain without lights, its sails torn to ribbons, and it struck "
                "the reef just below the tower an hour before dawn. By the time he had climbed down with his "
                "lantern, the waves had already begun to take it apart. On the deck, holding on to the mast, "
                "was a girl of about ten, and she was")


# ----------------------------------------------------------------------------------------- weights

from speed import source_270m  # noqa: E402  (the same float32 270M directory as speed.py)


def load_mlx_lm(path: Path, *, expand: bool = False):
    """mlx-lm's model of a directory; float32 throughout (scales too); `expand`: dequantized with its own
    `dequantize_model`, as our loader does on the CPU."""
    from mlx_lm.utils import dequantize_model, load_model

    model = load_model(Path(path))[0]
    if expand:
        model = dequantize_model(model)
    model.set_dtype(mx.float32)  # floating parameters only: packed weights stay packed
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------------------------- the variants

def _sync():
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)  # mlx-lm's own stream: its last queued step may still run
    mx.synchronize()


@dataclass
class Run:
    tokens: list
    t_first: float  # seconds from the call to the first token
    t_total: float  # seconds from the call to the last token
    stats: object = None  # ours: the last piece's Stats
    from_draft: int | None = None  # mlx-lm: tokens its loop marks as coming from the draft

    def tps(self, prefill: float) -> float:
        """Decode tok/s: the tokens after the first over the time after `prefill` (the target's time to its
        first token, from the tool's plain runs). Not the time after this run's own first token: ours
        speculating reports its first token together with the first round's (after the draft's prefill)."""
        t = self.t_total - prefill
        return (len(self.tokens) - 1) / t if t > 0 else float("nan")


@dataclass
class Variant:
    name: str
    tool: str  # "ours" or "mlx-lm": which plain run its output must equal
    fn: object  # fn(ids, n) -> Run
    spec: bool = True


def ours(model, tok, **kw):
    def fn(ids, n):
        toks, t0, t_first, t_last, last = [], time.perf_counter(), None, None, None
        for r in gemma3_mlx.stream_generate(model, tok, ids, max_tokens=n, stop_ids=(), **kw):
            if r.token is not None:
                t_last = time.perf_counter()
                t_first = t_first or t_last
                toks.append(r.token)
            last = r
        mx.synchronize()
        return Run(toks, t_first - t0, t_last - t0, last.stats)
    return fn


def mlx_lm_plain(model):
    def fn(ids, n):
        from mlx_lm.generate import generate_step

        return _time(generate_step(mx.array(ids), model, max_tokens=n))
    return fn


def mlx_lm_spec(model, draft, k):
    def fn(ids, n):
        from mlx_lm.generate import speculative_generate_step

        return _time(speculative_generate_step(mx.array(ids), model, draft, num_draft_tokens=k, max_tokens=n))
    return fn


def _time(it) -> Run:
    toks, nd, t0, t_first, t_last = [], 0, time.perf_counter(), None, None
    for item in it:
        t_last = time.perf_counter()
        t_first = t_first or t_last
        toks.append(int(item[0]))
        nd += bool(len(item) == 3 and item[2])
    _sync()
    return Run(toks, t_first - t0, t_last - t0, None, nd)


# ----------------------------------------------------------------------------------------- measuring

@dataclass
class Result:
    best: Run | None = None
    runs: list = field(default_factory=list)


def measure(variants: list[Variant], ids: list[int], n: int, rounds: int, label: str) -> dict[str, Result]:
    """Warm each variant up, then `rounds` interleaved rounds (order reversed on odd rounds); keep the
    fastest run of each (time to its last token). Every run's tokens are kept: greedy output must be the
    same every time."""
    t = time.perf_counter()
    for v in variants:
        v.fn(ids, min(n, 6))
    out = {v.name: Result() for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            run = v.fn(ids, n)
            res = out[v.name]
            res.runs.append(run)
            if res.best is None or run.t_total < res.best.t_total:
                res.best = run
            print(f"  [{label}] round {r + 1}: {v.name:38s} first token {run.t_first:6.2f} s, "
                  f"last {run.t_total:6.2f} s", flush=True)
    print(f"  [{label}] measured in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def same(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "yes" if k is None and len(a) == len(b) else f"NO (first difference at token {k})"


def identical(res: dict, v: Variant, plain: str) -> str:
    """Greedy identity of every run of `v` with the first plain run of its tool."""
    ref = res[plain].runs[0].tokens if plain in res else None
    verdicts = {same(r.tokens, ref) for r in res[v.name].runs}
    return "yes" if verdicts == {"yes"} else "; ".join(sorted(verdicts))


WIDTHS = (38, 9, 8, 11, 9, 8, 10)


def row(*cols, widths=WIDTHS):
    out = ""
    for c, w in zip(cols, widths):
        out += (f"{c:>{w}.2f}" if isinstance(c, float) else f"{c!s:>{w}}") if out else f"{c!s:<{w}}"
    print(out, flush=True)


def table(title, res, variants, summary, goals=None, problems=None):
    """Print one part's table: tok/s, ratio to its tool's plain decoding, acceptance, tokens per target
    step, drafts per step, greedy identity."""
    print(f"\n{title}")
    row("", "tok/s", "x plain", "acceptance", "tok/step", "k/step", "identical")
    plains = {v.tool: v.name for v in variants if not v.spec}
    prefill = {t: min(r.t_first for r in res[name].runs) for t, name in plains.items()}
    for v in variants:
        b = res[v.name].best
        base = res[plains[v.tool]].best.tps(prefill[v.tool]) if v.tool in plains else float("nan")
        b_tps = b.tps(prefill[v.tool])
        acc = tps = kps = "-"
        if v.spec and b.stats is not None:
            s = b.stats
            acc, tps = s.acceptance, s.tokens_per_step
            kps = s.draft_tokens / max(s.target_steps, 1)
            if s.target_steps == 0:
                acc = tps = kps = "off"
        elif v.spec and b.from_draft is not None:  # mlx-lm: drafts are num_draft_tokens per step (fewer at the end)
            acc = b.from_draft / max(v.k_steps(len(b.tokens), b.from_draft), 1)
            tps = len(b.tokens) / max(v.steps(len(b.tokens), b.from_draft), 1)
            kps = float(v.k)
        same_ = identical(res, v, plains.get(v.tool)) if v.spec else "-"
        row(v.name, b_tps, b_tps / base if base else float("nan"), acc, tps, kps, same_)
        if v.spec and same_ != "yes" and problems is not None:
            problems.append(f"{title}: {v.name}: greedy output differs from plain ({same_})")
        if v.spec and b.stats is not None:
            s = b.stats
            print(f"{'':4s}own stats: {s.generation_tps:.2f} tok/s, {s.draft_tokens} proposed, {s.accepted_tokens} "
                  f"kept, {s.target_steps} speculative target steps for {s.generation_tokens} tokens"
                  + (" (switched to plain decoding)" if s.target_steps and switched_off(s) else ""), flush=True)
        if goals and v.name in goals:
            what, goal, ok = goals[v.name]
            r = b_tps / base
            summary.append((what, r, goal, ok(r)))


class MlxSpec(Variant):
    """mlx-lm's speculative loop: each step drafts min(k, tokens left) and keeps a prefix plus one."""

    def __init__(self, name, fn, k):
        super().__init__(name, "mlx-lm", fn)
        self.k = k

    def steps(self, n_tokens, from_draft):
        return n_tokens - from_draft  # one target token per step

    def k_steps(self, n_tokens, from_draft):
        return self.k * self.steps(n_tokens, from_draft)  # drafts proposed (the last step may draft fewer)


# ----------------------------------------------------------------------------------------- part 5

SIZES = {  # GEMMA3_SPEC.md's table: layers, kv heads, head_dim, window, nominal parameters
    "270M": (18, 1, 256, 512, 270e6),
    "1B": (26, 1, 256, 512, 1.0e9),
    "4B": (34, 4, 256, 1024, 4.0e9),
    "12B": (48, 8, 256, 1024, 12.0e9),
    "27B": (62, 16, 128, 1024, 27.0e9),
}


def bytes_per_token(size: str, context: int, kv_bytes: int = 2) -> tuple[float, float]:
    """(weight bytes at 4 bits with group scales: params * 4.5 / 8, KV bytes read for one token at
    `context`): global layers ((i + 1) % 6 == 0) read the whole context, local layers their window."""
    layers, kv, hd, window, params = SIZES[size]
    n_global = sum((i + 1) % 6 == 0 for i in range(layers))
    per = 2 * kv * hd * kv_bytes
    return params * 4.5 / 8, per * (n_global * context + (layers - n_global) * min(context, window))


def switched_off(s) -> bool:
    """Whether the engine gave up speculating before the end: fewer tokens came from rounds than were made."""
    return s.accepted_tokens + s.target_steps < s.generation_tokens - 1


def expected_tokens(a: float, k: int) -> float:
    """Tokens per target step when each guess is kept with probability a (independently): 1 + a + ... + a^k."""
    return sum(a ** i for i in range(k + 1))


def part_metal(measured: dict, context: int = 4096):
    print(f"\n(5) Metal arithmetic: 4-bit weights (params x 4.5/8 bytes), 16-bit KV at {context} tokens of context")
    print("    When decoding is bound by memory bandwidth a forward pass costs the bytes it reads, and checking")
    print("    k+1 tokens in one target pass reads the target once, like one plain step. A round costs")
    print("    1 target pass + k draft passes, so  speedup ~ tokens_per_step / (1 + k * draft_bytes / target_bytes).")
    print(f"    {'model':6s} {'weights':>9s} {'KV read':>9s} {'total':>9s}  tok/s at 400 / 800 GB/s (bandwidth bound; an upper")
    print(f"    {'':6s} {'':9s} {'':9s} {'':9s}  bound: the small models are bound by per-step overhead long before)")
    tot = {}
    for s in SIZES:
        w, kv = bytes_per_token(s, context)
        tot[s] = w + kv
        print(f"    {s:6s} {w / 1e9:8.3f}G {kv / 1e9:8.3f}G {tot[s] / 1e9:8.3f}G  {400e9 / tot[s]:7.1f} / {800e9 / tot[s]:6.1f}")
    pairs = [("270M", "12B"), ("270M", "27B"), ("1B", "27B"), ("270M", "270M")]
    print("\n    draft -> target: draft/target bytes, then speedup for acceptance a and k guesses per round")
    cols = [(a, k) for a in (0.5, 0.7, 0.8, 0.9) for k in (3, 5)]
    print(f"    {'':16s} {'ratio':>7s}  " + " ".join(f"a={a:.1f},k={k}" for a, k in cols))
    for d, t in pairs:
        r = tot[d] / tot[t]
        sp = [expected_tokens(a, k) / (1 + k * r) for a, k in cols]
        print(f"    {d + ' -> ' + t:16s} {r:7.4f}  " + " ".join(f"{x:9.2f}" for x in sp))
    print("    (270M -> 270M is this CPU run: draft and target read the same bytes, so speedup <= (k+1)/(1+k) = 1:")
    print("     a same-size draft cannot pay. The engine's switch-off rule (after 8 rounds) assumes checking k+1")
    print("     tokens costs one plain step; on this CPU backend it costs more, see `switched off` below.)")
    for label, (tps, kps, off) in measured.items():
        line = f"    measured {label}: {tps:.2f} tokens per target step with {kps:.2f} guesses per step"
        line += f" (switched off: {'yes' if off else 'no'}) ->"
        if "lookup" in label:  # a proposal from the context costs no model pass
            line += f" ~{tps:.2f}x on any bandwidth-bound target (no draft pass to pay)"
        else:
            line += " " + ", ".join(f"{t}: ~{tps / (1 + kps * tot['270M'] / tot[t]):.2f}x" for t in ("12B", "27B"))
            line += (" -- arithmetic, not a measurement: only if a 270M's guesses were kept as often by that target"
                     " as here (by the model the draft was made from); a smaller, different model agrees less often:"
                     " see the a/k table above")
        print(line)


# ----------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 32 tokens, one round, no kept-quantized drafts (about 4 minutes on 2 busy cores)")
    ap.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    ap.add_argument("--source", help="float32 270M directory to reuse; converted there first if it holds no model")
    ap.add_argument("--draft", help="draft model directory (default: the 4-bit default model, gemma3_mlx.resolve(None))")
    ap.add_argument("--tokens", type=int, help="tokens generated per run (default 160; --quick 32)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 2; --quick 1)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="ours: guesses per round to start with (adaptive)")
    ap.add_argument("--mlx-lm-draft-tokens", type=int, default=3, help="mlx-lm: num_draft_tokens")
    ap.add_argument("--kept-draft", help="prompts (edit,story) on which to also run the draft kept quantized (ours "
                    "dequantize=False, mlx-lm as it loads it): slow on the CPU, whose quantized kernels prefill at ~11 "
                    "tok/s; default story (the short prompt), none with --quick; 'none' for none")
    a = ap.parse_args()
    q = a.quick
    parts = (a.parts or ",".join(PARTS)).split(",")
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    n = a.tokens or (32 if q else 160)
    rounds = a.rounds or (1 if q else 2)
    kept = set((a.kept_draft or ("none" if q else "story")).split(",")) - {"none"}
    if bad := kept - {"edit", "story"}:
        ap.error(f"--kept-draft: unknown prompt(s) {sorted(bad)}")
    if "mlx-lm" in parts:
        try:
            import mlx_lm
        except ImportError:
            print("mlx-lm is not installed: pip install mlx-lm (or leave out the mlx-lm part)", file=sys.stderr)
            return 1
        peer = f"mlx-lm {mlx_lm.__version__}, "
    else:
        peer = ""

    t_start = time.perf_counter()
    print(f"gemma3-mlx {gemma3_mlx.__version__}, {peer}mlx {mx.__version__}, device {mx.default_device()}, "
          f"parts {','.join(parts)}, {n} tokens, best of {rounds} round(s)", flush=True)
    summary, problems, measured = [], [], {}
    with tempfile.TemporaryDirectory() as tmpname:
        if any(p in parts for p in ("edit", "story", "draft", "mlx-lm")):
            src = source_270m(a.source, Path(tmpname))
            model, tok = gemma3_mlx.load(src, dtype="float32")
            draft_dir = Path(a.draft) if a.draft else gemma3_mlx.resolve(None)
            prompts = {"edit": tok.encode(EDIT_PROMPT), "story": tok.encode(STORY_PROMPT)}
            print(f"target {src} (float32); draft {draft_dir}; prompts: edit {len(prompts['edit'])} tokens, "
                  f"story {len(prompts['story'])} tokens", flush=True)
            d = {"draft": "draft" in parts, "mlx": "mlx-lm" in parts}
            drafts = {}
            if d["draft"]:
                drafts["f32"] = gemma3_mlx.load_model(draft_dir)
                if kept:
                    drafts["q"] = gemma3_mlx.load_model(draft_dir, dequantize=False)
            mlx = {}
            if d["mlx"]:
                mlx["target"] = load_mlx_lm(src)
                mlx["f32"] = load_mlx_lm(draft_dir, expand=True)
                if kept:
                    mlx["q"] = load_mlx_lm(draft_dir)
            k = a.mlx_lm_draft_tokens
            for pname in ("edit", "story"):
                ids = prompts[pname]
                vs = [Variant("ours plain", "ours", ours(model, tok), spec=False)]
                if pname in parts:
                    vs.append(Variant("ours prompt lookup", "ours", ours(model, tok, prompt_lookup=True,
                                                                         draft_tokens=a.draft_tokens)))
                if d["draft"]:
                    vs.append(Variant("ours draft 4-bit->f32 (default)", "ours",
                                      ours(model, tok, draft_model=drafts["f32"], draft_tokens=a.draft_tokens)))
                    if pname in kept:
                        vs.append(Variant("ours draft 4-bit kept (dequantize=F)", "ours",
                                          ours(model, tok, draft_model=drafts["q"], draft_tokens=a.draft_tokens)))
                if d["mlx"]:
                    if len(ids) + n >= WINDOW:
                        print(f"  (mlx-lm left out on the {pname} prompt: {len(ids)} + {n} tokens >= {WINDOW})")
                    else:
                        vs.append(Variant("mlx-lm plain", "mlx-lm", mlx_lm_plain(mlx["target"]), spec=False))
                        vs.append(MlxSpec(f"mlx-lm draft 4-bit->f32, k={k}", mlx_lm_spec(mlx["target"], mlx["f32"], k), k))
                        if pname in kept:
                            vs.append(MlxSpec(f"mlx-lm draft 4-bit kept, k={k}", mlx_lm_spec(mlx["target"], mlx["q"], k), k))
                if len(vs) == 1:
                    continue
                res = measure(vs, ids, n, rounds, pname)
                plain = res["ours plain"].best
                print(f"\n== {pname} prompt ({len(ids)} tokens), {n} tokens generated, best of {rounds}; "
                      f"greedy text of ours plain:\n{tok.decode(plain.tokens)!r}")
                num = "1" if pname == "edit" else "2"
                if pname in parts:
                    goal = (("(1) edit: prompt lookup / plain tok/s", ">= 1.80x", lambda r: r >= 1.8) if pname == "edit"
                            else ("(2) story: prompt lookup / plain tok/s", ">= 0.97x", lambda r: r >= 0.97))
                    table(f"({num}) prompt lookup, {pname} prompt", res, [v for v in vs if v.tool == "ours" and "draft" not in v.name],
                          summary, {"ours prompt lookup": goal}, problems)
                    s = res["ours prompt lookup"].best.stats
                    if s.target_steps:
                        measured[f"prompt lookup ({pname})"] = (s.tokens_per_step, s.draft_tokens / s.target_steps,
                                                                switched_off(s))
                if d["draft"]:
                    dv = [v for v in vs if v.tool == "ours" and ("draft" in v.name or not v.spec)]
                    table(f"(3) draft model, {pname} prompt", res, dv, summary,
                          {v.name: (f"(3) {pname}: {v.name.removeprefix('ours ')} / plain", "(info)", lambda r: None)
                           for v in dv if v.spec}, problems)
                    for v in dv[1:]:
                        s = res[v.name].best.stats
                        if s.target_steps:
                            measured[f"{v.name.removeprefix('ours ')} ({pname})"] = (
                                s.tokens_per_step, s.draft_tokens / s.target_steps, switched_off(s))
                if d["mlx"] and "mlx-lm plain" in res:
                    mv = [v for v in vs if v.tool == "mlx-lm"]
                    table(f"(4) mlx-lm speculative decoding, {pname} prompt", res, mv, summary,
                          {v.name: (f"(4) {pname}: {v.name} / mlx-lm plain", "(info)", lambda r: None)
                           for v in mv if v.spec}, problems)
                    print(f"    mlx-lm plain greedy == ours plain greedy: "
                          f"{same(res['mlx-lm plain'].runs[0].tokens, res['ours plain'].runs[0].tokens)}")
                    ob, mb = res["ours plain"].best, res["mlx-lm plain"].best
                    print(f"    ours plain / mlx-lm plain decode tok/s: "
                          f"{ob.tps(ob.t_first) / mb.tps(mb.t_first):.2f}x (each from its own first token)")
        if "metal" in parts:
            part_metal(measured)

    print("\nsummary (ratios from this run)")
    for what, r, goal, ok in summary:
        verdict = "" if ok is None else ("  met" if ok else "  NOT MET")
        print(f"  {what:58s} {r:6.2f}x  {goal}{verdict}")
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(f"  {p}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"wall time {time.perf_counter() - t_start:.0f} s, peak RSS {peak:.2f} GB (both tools in one process)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
