"""Constrained decoding: the tokenizer bridge, the mask op, refusals, and the engine's constrained rows
(never a refused token, batched = alone, the loop never waits on the host first, speculation = plain,
the matcher and the caches agree after rollbacks).

The engine's own assertion would catch a refused token; these tests check independently: every
reply is replayed through a fresh llguidance matcher built here, parsed with `json` and validated
with `jsonschema`.
"""

import json
import time

import jsonschema
import llguidance
import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx

from gemma3_mlx.constrain import Constraint, ConstraintError, allowed, vocabulary
from gemma3_mlx.engine import Engine
from gemma3_mlx.tokenizer import Tokenizer
from gemma3_mlx.settings import Sampling
from gemma3_mlx.speculate import DraftModel, PromptLookup
from test_engine import Pending, run, tiny_model

V = 262144
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(tokenizer_270m):
    return Tokenizer(tokenizer_270m)


@pytest.fixture(scope="module")
def vocab(tok):
    return vocabulary(tok, V)


@pytest.fixture(scope="module")
def model():
    """A random Gemma 3 with the real vocabulary's width."""
    return tiny_model(5, seed=3, vocab=V)


def replay(vocab, constraint, tokens, finish, stop_ids=(1, 106)):
    """An independent matcher consumes the reply: every token allowed; a "stop" reply is complete."""
    m = llguidance.LLMatcher(vocab.lltok, constraint.compiled, log_level=0)
    body = [t for t in tokens if t not in stop_ids]
    assert len(body) >= len(tokens) - 1  # at most the final stop token is not part of the reply
    for i, t in enumerate(body):
        assert m.consume_token(t), f"token {i} ({t}) refused: {m.get_error()}"
    if finish == "stop":
        assert m.is_accepting()


# ---------------------------------------------------------------- the bridge and the mask op

def test_bridge_decodes_and_encodes_like_the_tokenizer(tok, vocab):
    text = "Größe: 3 × 4 = 12 🙂\n\t{\"ok\": [1, 2]}  x"
    ids = tok.encode(text, add_bos=False)
    assert vocab.lltok.decode_bytes(ids) == text.encode("utf-8")
    assert vocab.lltok.tokenize_str(text) == ids
    assert vocab.lltok.is_special_token(106) and vocab.lltok.is_special_token(1)
    assert not vocab.lltok.is_special_token(ids[0])
    wide = vocabulary(tok, 262208)  # the 4B-27B logits width: the padding ids are never allowed
    m = Constraint.json_object().matcher(wide)
    mask = wide.fill([(m, 0)], 1)
    assert mask.shape == (1, 262208 // 32)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    assert bits[tok.vocab_size:].sum() == 0 and bits[:tok.vocab_size].sum() > 0


def test_mask_op_equals_numpy_unpacking():
    rng = np.random.default_rng(0)
    mask = rng.integers(-2**31, 2**31, size=(3, 10), dtype=np.int64).astype(np.int32)
    want = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(3, -1)[:, :300].astype(bool)
    assert (np.array(allowed(mask, 300)) == want).all()


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("make, why", [
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema([1, 2]), "must be an object"),
    (lambda: Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 3}), "nsatisfiable"),
    (lambda: Constraint.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "nsatisfiable"),
    (lambda: Constraint.json_schema({"type": "object", "dependentSchemas": {"a": {}}}), "dependentSchemas"),
    (lambda: Constraint.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (lambda: Constraint.json_schema({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"},
                                                                    "b": {"$ref": "#/$defs/a"}}}), "matches nothing"),
    (lambda: Constraint.json_schema({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
     "never end"),
    (lambda: Constraint.json_schema({"type": "object", "description": "x" * (5 << 20)}), "at most"),
    (lambda: Constraint.regex("a(b"), "unclosed group"),
    (lambda: Constraint.lark('start: "a" | ('), "Expected"),
    (lambda: Constraint.lark('start: "a" start'), "never end"),
    (lambda: Constraint.gbnf('root ::= "a" | ('), "GBNF"),
])
def test_what_cannot_run_is_refused_with_the_reason(vocab, make, why):
    t0 = time.perf_counter()
    with pytest.raises(ConstraintError) as e:
        make().check(vocab)
    assert time.perf_counter() - t0 < 2.0
    assert why in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) <= 300


def test_gbnf_and_lark_and_regex_compile(vocab):
    for c in (Constraint.gbnf('root ::= "yes" | "no"'), Constraint.lark('start: /[0-9]{3}/'),
              Constraint.regex(r"\d{4}-\d{2}-\d{2}"), Constraint.grammar('root ::= [a-c]+')):
        c.check(vocab)


def test_settings_carry_the_constraint():
    c = Constraint.json_object()
    s = Sampling(temp=0.5, constraint=c)
    assert s.replace(temp=0).constraint is c
    with pytest.raises(ValueError, match="constraint"):
        Sampling(constraint={"type": "object"})


# ---------------------------------------------------------------- the engine

def test_constrained_rows_match_their_schema_and_unconstrained_rows_are_unchanged(model, tok, vocab):
    """Constrained (greedy and sampled) and unconstrained rows share batches; each equals its run alone;
    every constrained reply replays through a fresh matcher, and those that stop validate."""
    prompts = [tok.encode(p) for p in ("Person:", "A list of people as JSON", "Hello", "Once upon a time")]
    person, anyobj = Constraint.json_schema(PERSON), Constraint.json_object()
    # Sampled rows draw from the top 50: batch 5's logits differ from batch 1's by ~2e-6 (the CPU's matmul
    # rounding), which can move a draw from a random model's near-uniform 262K-token distribution.
    settings = [Sampling(max_tokens=80, constraint=person), Sampling(max_tokens=60, temp=1.0, top_k=50, seed=5,
                                                                     constraint=anyobj),
                Sampling(max_tokens=30), Sampling(max_tokens=30, temp=0.8, seed=2),
                Sampling(max_tokens=80, temp=0.7, top_k=40, seed=9, constraint=person)]
    pairs = [(prompts[i % len(prompts)], s) for i, s in enumerate(settings)]
    engine = Engine(model, tokenizer=tok, max_batch=8)
    uids = [engine.submit(p, settings=s) for p, s in pairs]
    batched, finish = run(engine, uids)
    for (p, s), u in zip(pairs, uids):
        one = Engine(model, tokenizer=tok, max_batch=1)
        a = one.submit(p, settings=s)
        alone, fin = run(one, [a])
        assert alone[a] == batched[u] and fin[a] == finish[u]
        if s.constraint is not None:
            replay(vocab, s.constraint, batched[u], finish[u])
            if finish[u] == "stop":
                doc = json.loads(tok.decode(batched[u]))
                if s.constraint is person:
                    jsonschema.validate(doc, PERSON)
    stopped = [finish[u] for u, (_, s) in zip(uids, pairs) if s.constraint is not None]
    assert stopped.count("stop") >= 2, finish  # the test means something only if replies end


def test_a_completed_constraint_ends_the_row_without_a_stop_token(model, tok):
    """`"yes"` or `"no"`: the row ends on the grammar's last token, the closing event carries "stop"."""
    engine = Engine(model, tokenizer=tok)
    u = engine.submit(tok.encode("Answer:"), settings=Sampling(max_tokens=20, constraint=Constraint.regex("(yes|no)")))
    events = []
    while engine.has_work:
        events += engine.step()
    text = tok.decode([e.token for e in events if e.token is not None])
    assert text in ("yes", "no")
    assert events[-1].token is None and events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])


def test_constrained_step_is_queued_before_its_token_is_read(model, tok, monkeypatch):
    """With a constrained row in the batch: step n+1's forward pass is dispatched before step n's
    tokens are read; the draw of n+1 (which needs the mask) is queued after."""
    engine = Engine(model, tokenizer=tok, max_batch=2)
    engine.submit(tok.encode("Person:"), settings=Sampling(max_tokens=200, constraint=Constraint.lark(
        'start: item+\nitem: /[a-z]{1,6}/ " "')))
    engine.submit(tok.encode("Free text"), settings=Sampling(max_tokens=200))
    while len(engine.rows) < 2:
        engine.step()
    log = []
    real_async, real_eval = mx.async_eval, mx.eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (log.append("dispatch"), real_async(*a))[1])
    monkeypatch.setattr(mx, "eval", lambda *a, **k: (log.append("eval"), real_eval(*a, **k))[1])
    for _ in range(8):
        engine.pending = Pending(engine.pending, log)
        log.clear()
        events = engine.step()
        assert log == ["queued", "dispatch", "read", "dispatch"], log
        assert len(events) == 2
    monkeypatch.undo()


class Oracle:
    """A proposer that knows the plain reply and gets every third guess wrong (a token the constraint
    allows there, or one it refuses): rounds keep some guesses and reject others."""

    def __init__(self, prompt, reply, wrong):
        self.n, self.reply, self.wrong, self.calls = len(prompt), reply, wrong, 0

    def propose(self, tokens, k, sampler=None):
        self.calls += 1
        done = len(tokens) - self.n
        guess = list(self.reply[done : done + k])
        if len(guess) > 1:
            guess[min(1 + self.calls % 3, len(guess) - 1)] = self.wrong[self.calls % len(self.wrong)]
        return guess, None

    def close(self):
        pass


@pytest.mark.parametrize("proposer", ["oracle", "draft"])
def test_speculation_with_a_schema_equals_plain_constrained_greedy(model, tok, vocab, proposer):
    """Greedy: the same tokens with and without speculation; the matcher is rolled back with the
    cache after rejected guesses (checked after every round against a fresh replay)."""
    other = tiny_model(5, seed=11, vocab=V)
    schema = Constraint.json_schema({"type": "object", "properties": {
        "a": {"type": "array", "items": {"type": "integer"}, "maxItems": 6}, "b": {"type": "string", "maxLength": 20}},
        "required": ["a", "b"]})
    prompt = tok.encode('{"a": [1, 2, 3], "b": "xyz"} {"a": [1, 2, 3], "b": "xyz"} ')
    plain = Engine(model, tokenizer=tok)
    u = plain.submit(prompt, settings=Sampling(max_tokens=60, constraint=schema))
    want, wfin = run(plain, [u])
    spec = Engine(model, tokenizer=tok)
    wrong = tok.encode(' ", 7 x}', add_bos=False)
    draft = Oracle(prompt, want[u], wrong) if proposer == "oracle" else DraftModel(other)
    s = spec.submit(prompt, settings=Sampling(max_tokens=60, constraint=schema), draft=draft, draft_tokens=4)
    got, rounds, stats = [], 0, None
    while spec.has_work:
        for e in spec.step():
            if e.token is not None:
                got.append(e.token)
            stats = e.stats
        for seq in spec.spec:  # after each round: matcher state == a fresh replay of the tokens out
            rounds += 1
            fresh = llguidance.LLMatcher(vocab.lltok, schema.compiled, log_level=0)
            assert fresh.consume_tokens(seq.tokens)
            assert (vocab.fill([(fresh, 0)], 1) == vocab.fill([(seq.matcher, 0)], 1)).all()
            assert seq.cache.tokens == seq.prompt + seq.tokens[:-1]
    assert got == want[u] and rounds > 0
    if proposer == "oracle":  # guesses were both kept and rejected
        assert stats.draft_tokens > stats.accepted_tokens > 0, stats
    replay(vocab, schema, got, wfin[u])


def test_a_cache_reused_under_another_constraint_gives_what_a_fresh_one_gives(model, tok):
    """A prompt cache's snapshot keeps the model's logits, never a constraint's masked ones: a second
    request on the same conversation, under another constraint, equals the same request on a fresh cache
    (this once hung the server: the regex's mask met the JSON mask left in the snapshot)."""
    from gemma3_mlx.prompt_cache import PromptCache

    prompt = tok.encode("Hi")
    pc = PromptCache(model)
    first = Engine(model, tokenizer=tok)
    run(first, [first.submit(prompt, cache=pc, settings=Sampling(max_tokens=30, constraint=Constraint.json_object()))])
    regex = Sampling(max_tokens=12, constraint=Constraint.regex("[0-9]{3}-[a-z]{2}"))
    again, fresh = Engine(model, tokenizer=tok), Engine(model, tokenizer=tok)
    a, b = again.submit(prompt, cache=pc, settings=regex), fresh.submit(prompt, settings=regex)
    (got, gfin), (want, wfin) = run(again, [a]), run(fresh, [b])
    assert got[a] == want[b] and gfin[a] == wfin[b] == "stop"
    assert pc.reprocessed == 0  # the prompt came from the snapshot


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("args, why", [
    (["--regex", "a(b"], "unclosed group"),
    (["--json-schema", '{"type": "integer", "minimum": 5, "maximum": 1}'], "minimum"),
    (["--json-schema", "no-such-schema.json"], "no such file"),
    (["--grammar", 'start: "x" | ('], "Expected"),
    (["--regex", "a", "--json-schema", "{}"], "give one of"),
])
def test_cli_refuses_a_bad_constraint_in_one_line(default_model_dir, args, why):
    from typer.testing import CliRunner

    from gemma3_mlx.cli.main import app

    r = CliRunner().invoke(app, ["generate", "--raw", "x", "-m", str(default_model_dir), *args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], r.output


def test_cli_generate_with_a_schema_writes_matching_json(default_model_dir, tmp_path):
    from typer.testing import CliRunner

    from gemma3_mlx.cli.main import app

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = CliRunner().invoke(app, ["generate", "--raw", "France's capital as JSON:", "-m", str(default_model_dir),
                                 "-n", "24", "--json-schema", str(tmp_path / "s.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout), schema)
