"""Structured output and tool calls through `gemma3 serve` and the official openai client.

Two tiny random models with the real tokenizer are served in this process: `plain` (as in
test_server.py) and `jsonish`, whose JSON punctuation is made likelier (see `jsonish`) so that its
constrained replies end within a few dozen tokens and, given tools with `auto`, it calls them. Every document is checked with `json` and
`jsonschema`, independently of the grammar that produced it.
"""

import json
import threading
import time
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pydantic
import pytest

from test_server import KEY, Tiny, make_tiny

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {
    "name": "convert", "description": "Convert an amount between currencies",
    "parameters": {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 1, "maximum": 999},
                                                    "to": {"enum": ["EUR", "USD", "JPY"]}},
                   "required": ["amount", "to"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CONVERT)}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int


def jsonish(path: Path, opener: float = 6.0) -> Path:
    """Make JSON punctuation likely everywhere: every embedding row gets a large first coordinate, which
    the residual stream keeps, so the final hidden state points along it at every position; the tied
    head then adds about sqrt(D) x (that coordinate) to each token's logit, and the punctuation's rows
    get more of it. Strings close at once, numbers after a digit or two; after a newline (a reply's
    start) "[" or "{" comes first: a list of calls when tools are offered (`opener`: how strongly; 30 makes
    a call come first even where plain text may)."""
    from gemma3_mlx.tokenizer import Tokenizer

    tok = Tokenizer(path / "tokenizer.model")
    weights = dict(mx.load(str(path / "model.safetensors")))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    emb = np.array(weights[key])
    emb[:, 0] = 4.0
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i).strip(b" ")
        if b[:1] == b'"' and set(b) <= set(b'"}],:'):  # a string closes (or opens) first,
            emb[i, 0] += 3.5
        elif b[:1] in (b"}", b"]") and set(b) <= set(b"}],"):  # then objects and arrays close (rather than go on),
            emb[i, 0] += 2.0 if b"," in b else 3.0
        elif b == b",":
            emb[i, 0] += 2.0
        elif b in (b"{", b"["):  # openers: "[" a little likelier (a list of calls where one is allowed)
            emb[i, 0] += 1.5 + 0.3 * (b == b"[")
            emb[i, 1] = opener  # ... and likeliest right after a newline (the start of a reply):
    emb[tok.encode("\n", add_bos=False)[-1], 1] = 2.0  # the newline's state leans along coordinate 1
    weights[key] = mx.array(emb)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


@pytest.fixture(scope="module")
def plain(tokenizer_270m, tmp_path_factory):
    server = Tiny(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("st") / "tiny-plain"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def js(tokenizer_270m, tmp_path_factory):
    d = make_tiny(tokenizer_270m, tmp_path_factory.mktemp("st") / "tiny-json")
    server = Tiny(jsonish(d), max_body=16 << 20)
    yield server
    server.close()


def ask(server, content="Hi", **kw):
    return server.chat(content, max_tokens=kw.pop("max_tokens", 48), **kw)


def check_calls(message, tools=SCHEMAS):
    """Each call names a declared tool and its arguments validate against that tool's schema."""
    assert message.content is None and message.tool_calls
    for c in message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), tools[c.function.name])
    return [(c.function.name, c.function.arguments) for c in message.tool_calls]


# ---------------------------------------------------------------------- response_format


def test_parse_with_pydantic_whole_and_streamed(js):
    whole = js.client.chat.completions.parse(model=js.name, messages=[{"role": "user", "content": "Who?"}],
                                             response_format=Person, temperature=0, max_tokens=80)
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person) and msg.parsed == Person.model_validate_json(msg.content)
    jsonschema.validate(json.loads(msg.content), Person.model_json_schema())
    with js.client.chat.completions.stream(model=js.name, messages=[{"role": "user", "content": "Who?"}],
                                           response_format=Person, temperature=0, max_tokens=80) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == msg.content and final.choices[0].message.parsed == msg.parsed


def test_json_object_and_schema_streamed_equal_whole(js, plain):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "array",
              "items": {"type": "integer"}, "maxItems": 4}}, "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
    for server in (js, plain):
        whole = ask(server, response_format=fmt, max_tokens=40)
        parts = [c.choices[0].delta.content or "" for c in ask(server, response_format=fmt, max_tokens=40,
                                                                stream=True) if c.choices]
        assert "".join(parts) == whole.choices[0].message.content
        if whole.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    r = ask(js, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = ask(js, response_format={"type": "regex", "regex": "[0-9]{3}-[a-z]{2}"})
    assert r.choices[0].finish_reason == "stop"
    import re
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].message.content)


# ---------------------------------------------------------------------- tools


def test_tool_choice_required_named_and_parallel(js):
    r = ask(js, "Weather in Paris?", tools=[WEATHER, CONVERT], tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and len(check_calls(r.choices[0].message)) == 1
    named = ask(js, tools=[WEATHER, CONVERT], tool_choice={"type": "function", "function": {"name": "convert"}})
    assert [n for n, _ in check_calls(named.choices[0].message)] == ["convert"]
    par = ask(js, tools=[WEATHER, CONVERT], tool_choice="required", max_tokens=120)  # "[" likeliest: a list
    assert par.choices[0].finish_reason == "tool_calls" and len(check_calls(par.choices[0].message)) >= 2


def test_auto_answers_in_text_or_calls(plain, js):
    text = ask(plain, "Hello there", tools=[WEATHER], tool_choice="auto", max_tokens=12, temperature=0)
    m = text.choices[0].message
    assert m.tool_calls is None and m.content and m.content.lstrip()[:1] not in "{["
    assert text.choices[0].finish_reason == "length"
    # The same prompt (the instructions depend on the tools alone) with no grammar at all: a greedy reply
    # the auto grammar allows as text comes out word for word the same under it.
    free = ask(plain, "Hello there", tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0)
    assert free.choices[0].message.content == m.content
    # (auto ending in a call: the grammar is checked in test_tools.py; the reply's path is required's)
    none = ask(js, "Weather?", tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert none.choices[0].message.tool_calls is None


def test_streamed_tool_calls_reassemble_to_the_whole_reply(js):
    kw = dict(tools=[WEATHER, CONVERT], tool_choice="required", max_tokens=120)
    whole = check_calls(ask(js, "Go", **kw).choices[0].message)
    calls, finish = {}, None
    for chunk in ask(js, "Go", stream=True, **kw):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"name": "", "arguments": ""})
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == whole


def test_a_tool_round_trip_reuses_the_conversation_cache(js):
    """The call is rendered back exactly as generated, so the next request (with the tool's result,
    and another tool_choice) processes only the result and the new turn."""
    system = "You are a weather bot for travellers. Answer in one short sentence, in metric units. " * 8
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Paris?"}]
    first = ask(js, messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    second = ask(js, messages, tools=[WEATHER], tool_choice="none", max_tokens=4)
    u = second.usage
    assert u.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0.9 * u.prompt_tokens, u
    # a result for a call nobody made is refused
    bad = messages[:-1] + [{"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="no earlier assistant message called"):
        ask(js, bad, tools=[WEATHER])


# ---------------------------------------------------------------------- refusals


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 9, "maximum": 1}}}}, "nsatisfiable"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}}, "matches nothing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "d" * (5 << 20)}}}}, "at most"),
    ({"response_format": {"type": "regex", "regex": "a(b"}}, "unclosed group"),
    ({"response_format": {"type": "grammar", "grammar": 'start: "a" | ('}}, "Expected"),
    ({"response_format": {"type": "grammar", "grammar": 'start: "x" start'}}, "never end"),
    ({"response_format": {"type": "yaml"}}, "type must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
        "required": ["a"]}}}], "tool_choice": "required"}, "nsatisfiable"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "d" * (1 << 20)}}}], "tool_choice": "required"}, "at most"),  # was a 500
]


@pytest.mark.parametrize("extra, why", BAD)
def test_what_cannot_run_is_a_400_naming_why_and_the_server_goes_on(js, extra, why):
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        js.client.chat.completions.create(model=js.name, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, **extra)
    assert time.perf_counter() - t0 < 2.0
    assert why in e.value.body["message"], e.value.body
    assert ask(js, max_tokens=2).choices[0].finish_reason == "length"
