"""JSONSchemaBench (issue 22): real-world schemas either compile and then every finished document
validates with `jsonschema`, or they are refused with a ConstraintError that says why.

The sample (tests/fixtures/jsonschemabench/, drawn by tests/fixtures/record_jsonschemabench.py with a
fixed seed) holds 285 schemas from the benchmark's ten sets. The bulk runs on a tiny random Gemma 3
with the real 262,144-piece tokenizer: a random model left alone writes endless strings, so this
one's output head adds a fixed bias to the logits of JSON's structural tokens (pieces made only of
quotes, braces, brackets, commas, colons, digits and spaces), highest for pieces that open with a
quote (closing a string), then a closing brace or bracket (closing a container), then a comma, then
the rest. The bias changes which allowed token wins, never which are allowed: the grammar's mask
still decides that. Decoding is greedy, so the run is deterministic and its coverage per set is
pinned below (what was measured, less a small margin), so a regression in the compiler, the mask
or the engine fails here. A dozen schemas then run on the real 270M.

A schema that `jsonschema` itself cannot apply (a `$ref` it cannot resolve) is counted apart
("unvalidatable"): its documents are neither valid nor invalid to us.
"""

import json
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import jsonschema
import mlx.core as mx

from conftest import FIXTURES
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.constrain import Constraint, ConstraintError, vocabulary
from gemma3_mlx.engine import Engine
from gemma3_mlx.model import Model
from gemma3_mlx.settings import Sampling
from gemma3_mlx.tokenizer import Tokenizer

SAMPLE = FIXTURES / "jsonschemabench"
SETS = ["Github_trivial", "Github_easy", "Github_medium", "Github_hard", "Github_ultra", "Glaiveai2K",
        "JsonSchemaStore", "Kubernetes", "Snowplow", "WashingtonPost"]
MAX_TOKENS = 64
# Measured with llguidance 1.9.1 (greedy, so deterministic): set -> (compiled, finished "stop" and
# valid). Floors are these less a margin of 1 compiled and 3 documents.
MEASURED = {
    "Github_trivial": (28, 26), "Github_easy": (30, 29), "Github_medium": (26, 20), "Github_hard": (15, 8),
    "Github_ultra": (10, 5), "Glaiveai2K": (29, 26), "JsonSchemaStore": (16, 12), "Kubernetes": (30, 27),
    "Snowplow": (28, 22), "WashingtonPost": (29, 29),
}
# (set, id) -> why: known cases where a finished document does not validate (a bug, reported).
KNOWN_INVALID: dict[tuple[str, str], str] = {}


def load_sample() -> list[tuple[str, str, object]]:
    rows = []
    for name in SETS:
        with open(SAMPLE / f"{name}.jsonl", encoding="utf-8") as f:
            rows += [(name, r["id"], r["schema"]) for r in map(json.loads, f)]
    return rows


def json_leaning_model(tok: Tokenizer) -> Model:
    """A random 2-layer Gemma 3 (hidden 16, so the 262,144-wide head is cheap) whose logits favour
    JSON's structural pieces by a fixed bias (see the module's docstring)."""
    cfg = ModelConfig.from_dict({
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "query_pre_attn_scalar": 8, "sliding_window": 8, "max_position_embeddings": 4096,
    })
    bias = np.zeros(262144, np.float32)
    structural = set(b'"{}[],:0123456789 ')
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if b.strip() and set(b) <= structural:
            bias[i] = {ord('"'): 12.0, ord("}"): 9.0, ord("]"): 9.0, ord(","): 7.0}.get(b[0], 5.0)
    favour = mx.array(bias)

    class JsonLeaning(Model):
        def head(self, h):
            return super().head(h) + favour

    mx.random.seed(22)
    model = JsonLeaning(cfg)
    mx.eval(model.parameters())
    return model


def check(schema, text: str) -> str:
    """'valid', 'invalid: why' (not JSON, or against the schema) or 'unvalidatable: why'."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        return f"invalid: not JSON ({e}): {text[:120]!r}"
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(doc))
    except Exception as e:  # jsonschema cannot apply the schema itself (an unresolvable $ref, ...)
        return f"unvalidatable: {type(e).__name__}: {str(e)[:120]}"
    return f"invalid: {errors[0].message[:160]} in {text[:160]!r}" if errors else "valid"


def generate(engine: Engine, prompts, jobs, max_tokens: int) -> dict:
    """{key: (tokens, finish)} for jobs [(key, constraint)], greedy, batched by the engine."""
    uids = {engine.submit(prompts(key), settings=Sampling(max_tokens=max_tokens, constraint=c)): key
            for key, c in jobs}
    tokens, finish = defaultdict(list), {}
    while engine.has_work:
        for e in engine.step():
            if e.token is not None:
                tokens[uids[e.uid]].append(e.token)
            if e.finish_reason:
                finish[uids[e.uid]] = e.finish_reason
    return {key: (tokens[key], finish[key]) for key in uids.values()}


@pytest.fixture(scope="module")
def tok(tokenizer_270m):
    return Tokenizer(tokenizer_270m)


def test_sample_is_what_the_manifest_says():
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    rows = load_sample()
    assert Counter(name for name, _, _ in rows) == {k: v["sampled"] for k, v in manifest["sets"].items()}
    assert len({(name, sid) for name, sid, _ in rows}) == len(rows) == 285
    assert sum(f.stat().st_size for f in SAMPLE.iterdir()) < 1_500_000


@pytest.mark.slow  # 285 schemas compiled, 200 constrained generations
def test_jsonschemabench_sample_compiles_or_is_refused_and_finished_documents_validate(tok):
    vocab = vocabulary(tok, 262144)
    table = {name: Counter() for name in SETS}
    jobs, schemas, refusals, t_compile = [], {}, Counter(), []
    for name, sid, schema in load_sample():
        t = time.perf_counter()
        try:
            c = Constraint.json_schema(schema)
            c.check(vocab)
        except ConstraintError as e:
            assert str(e).strip(), f"{name}/{sid} refused without a reason"
            table[name]["refused"] += 1
            refusals[str(e).split(":")[0][:60]] += 1
            continue
        finally:
            t_compile.append(time.perf_counter() - t)
        table[name]["compiled"] += 1
        jobs.append(((name, sid), c))
        schemas[name, sid] = schema

    model = json_leaning_model(tok)
    out = generate(Engine(model, tokenizer=tok, max_batch=8), lambda key: [2], jobs, MAX_TOKENS)
    invalid, known = [], []
    for (name, sid), (tokens, finish) in out.items():
        if finish != "stop":
            table[name][finish] += 1
            continue
        verdict = check(schemas[name, sid], tok.decode(tokens))
        kind = verdict.split(":")[0]
        table[name]["stop " + kind] += 1
        if kind == "invalid":
            (known if (name, sid) in KNOWN_INVALID else invalid).append(f"{name}/{sid}: {verdict}")

    print(f"\n{'set':16} {'sample':>6} {'compiled':>8} {'refused':>7} {'stop+valid':>10} {'length':>6} "
          f"{'unvalidatable':>13} {'invalid':>7}")
    for name in SETS:
        n = table[name]
        print(f"{name:16} {n['compiled'] + n['refused']:6} {n['compiled']:8} {n['refused']:7} "
              f"{n['stop valid']:10} {n['length']:6} {n['stop unvalidatable']:13} {n['stop invalid']:7}")
    t_compile.sort()
    print(f"compile+check: p50 {t_compile[len(t_compile) // 2] * 1e3:.1f} ms, "
          f"max {t_compile[-1] * 1e3:.1f} ms; refusals: {dict(refusals.most_common())}")

    assert not invalid, f"{len(invalid)} finished documents do not validate:\n" + "\n".join(invalid)
    for name in SETS:
        compiled, valid = MEASURED[name]
        n = table[name]
        assert n["compiled"] >= compiled - 1, f"{name}: {n['compiled']} compiled, {compiled} measured"
        assert n["stop valid"] >= valid - 3, f"{name}: {n['stop valid']} finished and valid, {valid} measured"
    if known:
        pytest.xfail(f"{len(known)} known invalid documents: " + "; ".join(known))


REAL_MAX_TOKENS = 64


def test_a_dozen_schemas_on_the_real_270m(default_model):
    """The first schema of each set that compiles and is at most 1,500 characters (three of Glaive's
    function-call schemas, two of Github_trivial's; Github_ultra has none that small), asked for in
    the chat format, greedy, 64 tokens: every document that finishes validates. The 270M often
    copies the schema's own keys (extra properties are allowed) and runs out of tokens, so only a
    few finish: at least 3 of the 12 (4 measured: 5 minutes wall, 71 s of CPU, on 2 busy cores)."""
    model, tok = default_model
    vocab = vocabulary(tok, model.config.text.vocab_size)
    want = {"Glaiveai2K": 3, "Github_trivial": 2}
    picked = {}
    for name, sid, schema in load_sample():
        text = json.dumps(schema)
        if sum(k[0] == name for k in picked) >= want.get(name, 1) or len(text) > 1500:
            continue
        try:
            c = Constraint.json_schema(schema)
            c.check(vocab)
        except ConstraintError:
            continue
        picked[name, sid] = (text, c)
    assert len(picked) == 12

    def prompt(key):
        ask = "Reply with a JSON document that follows this JSON schema:\n" + picked[key][0]
        return tok.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True)

    out = generate(Engine(model, tokenizer=tok, max_batch=8), prompt, [(k, v[1]) for k, v in picked.items()],
                   REAL_MAX_TOKENS)
    stopped = []
    for (name, sid), (tokens, finish) in out.items():
        text = tok.decode(tokens)
        print(f"{name}/{sid}: {finish} after {len(tokens)} tokens: {text[:100]!r}")
        if finish == "stop":
            verdict = check(json.loads(picked[name, sid][0]), text)
            assert verdict == "valid", f"{name}/{sid}: {verdict}"
            stopped.append(sid)
        else:
            assert finish == "length" and len(tokens) == REAL_MAX_TOKENS
    assert len(stopped) >= 3, f"only {stopped} finished"
