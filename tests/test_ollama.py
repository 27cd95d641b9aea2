"""`gemma3 serve`'s Ollama routes through the official `ollama` Python client (on the OpenAI port).

The tiny model with the real tokenizer (test_server's fixture, API key required) serves in this
process; replies are compared with gemma3_mlx.generate on the same weights, token for token (greedy).
All traffic goes to 127.0.0.1.
"""

import http.client
import json
import math

import ollama
import pytest
from mlx.utils import tree_flatten

import gemma3_mlx
from test_server import KEY, Tiny, make_tiny


@pytest.fixture(scope="module")
def tiny(tokenizer_270m, tmp_path_factory):
    path = make_tiny(tokenizer_270m, tmp_path_factory.mktemp("ollama") / "tiny-chat")
    server = Tiny(path)
    server.path = path
    server.ollama = ollama.Client(host=f"http://127.0.0.1:{server.port}", headers={"Authorization": f"Bearer {KEY}"},
                                  timeout=60)
    yield server
    server.close()


def reference(tiny, messages, n: int) -> tuple[str, int]:
    """(greedy text of n tokens, prompt length) straight from the library, not through the server."""
    ids = tiny.tokenizer.apply_chat_template(messages)
    return gemma3_mlx.generate(tiny.model, tiny.tokenizer, ids, max_tokens=n), len(ids)


def test_list_show_ps_and_version(tiny):
    weights = [v for _, v in tree_flatten(tiny.model.parameters())]  # float32, not quantized: a value each
    listed = tiny.ollama.list().models
    assert [m.model for m in listed] == ["tiny-chat:latest"]
    assert listed[0].size == 4 * sum(v.size for v in weights) and listed[0].details.family == "gemma3"
    assert listed[0].details.parameter_size == f"{sum(v.size for v in weights) / 1e6:.0f}M"
    t = tiny.model.config.text
    shown = tiny.ollama.show("tiny-chat")
    assert shown.modelinfo["gemma3.context_length"] == 2048 == t.max_position_embeddings
    assert shown.modelinfo["gemma3.attention.sliding_window"] == 32
    assert shown.modelinfo["gemma3.block_count"] == t.num_hidden_layers
    assert shown.capabilities == ["completion", "tools"] and shown.details.quantization_level == "F32"
    assert "<start_of_turn>" in shown.template
    running = tiny.ollama.ps().models
    assert [m.model for m in running] == ["tiny-chat:latest"] and running[0].context_length == 2048
    c = http.client.HTTPConnection("127.0.0.1", tiny.port, timeout=10)
    c.request("GET", "/api/version")
    assert json.loads(c.getresponse().read())["version"].count(".") == 2
    with pytest.raises(ollama.ResponseError) as e:
        tiny.ollama.show("llama3.2")
    assert e.value.status_code == 404 and e.value.error == "model 'llama3.2' not found"
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=f"http://127.0.0.1:{tiny.port}").list()  # no key
    assert e.value.status_code == 401


def test_chat_whole_and_streamed_equal_the_library(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    want, n_prompt = reference(tiny, messages, 10)
    r = tiny.ollama.chat("tiny-chat", messages=messages, options={"num_predict": 10, "temperature": 0}, stream=False)
    assert r.message.role == "assistant" and r.message.content == want
    assert r.done and r.done_reason == "length" and r.eval_count == 10 and r.prompt_eval_count == n_prompt
    assert r.total_duration >= r.eval_duration > 0 and r.model == "tiny-chat"
    parts = list(tiny.ollama.chat("tiny-chat:latest", messages=messages, options={"num_predict": 10}, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == want
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 10 and parts[-1].message.content == ""
    # the same reply through the OpenAI route of the same port
    assert tiny.chat(messages, max_tokens=10).choices[0].message.content == want


def test_generate_templated_and_raw(tiny):
    want, n_prompt = reference(tiny, [{"role": "system", "content": "Answer in French."},
                                      {"role": "user", "content": "Why is the sky blue?"}], 8)
    r = tiny.ollama.generate("tiny-chat", "Why is the sky blue?", system="Answer in French.",
                             options={"num_predict": 8}, keep_alive="10m")
    assert r.response == want and r.prompt_eval_count == n_prompt and r.done_reason == "length"
    streamed = list(tiny.ollama.generate("tiny-chat", "Why is the sky blue?", system="Answer in French.",
                                         options={"num_predict": 8}, stream=True))
    assert "".join(p.response for p in streamed) == want and streamed[-1].eval_count == 8
    ids = tiny.tokenizer.encode("Once upon a time")
    raw = tiny.ollama.generate("tiny-chat", "Once upon a time", raw=True, options={"num_predict": 5})
    assert raw.response == gemma3_mlx.generate(tiny.model, tiny.tokenizer, ids, max_tokens=5)
    assert raw.prompt_eval_count == len(ids) and raw.context is None  # no context: see serve_ollama
    assert tiny.ollama.generate("tiny-chat", "").done_reason == "load"  # Ollama's way to load a model
    assert tiny.ollama.generate("tiny-chat", "", keep_alive=0).done_reason == "unload"


def test_options_map_onto_the_sampling_settings(tiny):
    msg = [{"role": "user", "content": "Pick some words."}]

    def reply(**options):
        return tiny.ollama.chat("tiny-chat", messages=msg, stream=False, options={"num_predict": 10, **options})

    a, b, c = (reply(temperature=1.0, seed=s).message.content for s in (7, 7, 8))
    assert a == b and a != c
    greedy = reply().message.content  # options left out: the server's default (greedy)
    assert greedy == reference(tiny, msg, 10)[0] == reply(temperature=0, top_k=-1, seed=-1).message.content
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    cut = reply(stop=[stop, "never-seen"])
    assert cut.done_reason == "stop" and cut.message.content == greedy[: greedy.index(stop)]
    # unknown options are ignored (as Ollama does), runner options and keep_alive have no effect
    assert reply(mirostat=2, num_gpu=99, num_thread=1, num_ctx=4096, use_mmap=True, typical_p=1.0,
                 presence_penalty=0).message.content == greedy
    assert reply(num_predict=3.0).eval_count == 3  # JSON numbers are floats to Ollama: an integral one is fine
    n_prompt = reference(tiny, msg, 1)[1]
    capped = reply(num_predict=-1, num_ctx=n_prompt + 7)  # num_ctx holds the prompt and the reply
    assert capped.eval_count == 7 and capped.done_reason == "length" and greedy.startswith(capped.message.content)
    assert reply(num_ctx=n_prompt + 50).eval_count == 10  # num_predict comes first when it is smaller
    with pytest.raises(ollama.ResponseError) as e:
        reply(num_ctx=n_prompt - 1)
    assert e.value.status_code == 400 and f"the prompt has {n_prompt} tokens: more than num_ctx {n_prompt - 1}" \
        == e.value.error
    penalized = reply(repeat_penalty=1.5).message.content  # the tiny random model repeats itself: it shows
    assert penalized != greedy and reply(repeat_penalty=1.5, repeat_last_n=64).message.content == penalized
    assert reply(repeat_penalty=1.5, repeat_last_n=0).message.content == greedy  # Ollama: 0 turns it off
    assert reply(repeat_penalty=1.5, repeat_last_n=-1).message.content == reply(
        repeat_penalty=1.5, repeat_last_n=10**18).message.content  # -1: the whole context, as any larger
    for options, words in (({"temperature": "hot"}, 'option "temperature" must be of type float32'),
                           ({"num_predict": 2.5}, 'option "num_predict" must be of type integer'),
                           ({"stop": "x"}, 'option "stop" must be of an array of strings'),
                           ({"presence_penalty": 1.5}, "presence_penalty"),
                           ({"top_p": 0}, "top-p"), ({"repeat_penalty": -1}, "repetition penalty"),
                           ({"num_predict": 5000}, "2048")):
        with pytest.raises(ollama.ResponseError) as e:
            reply(**options)
        assert e.value.status_code == 400 and words in e.value.error, (options, e.value.error)


def test_refusals_in_ollamas_shape(tiny):
    for call, words in (
        (lambda: tiny.ollama.generate("tiny-chat", "hi", template="{{ .Prompt }}"), "template"),
        (lambda: tiny.ollama.generate("tiny-chat", "hi", context=[1, 2, 3]), "context"),
        (lambda: tiny.ollama.generate("tiny-chat", "hi", suffix="end"), "suffix"),
        (lambda: tiny.ollama.generate("tiny-chat", "hi", raw=True, system="x"), "raw mode"),
        (lambda: tiny.ollama.chat("tiny-chat", messages=[{"role": "user", "content": "hi"}], think=True), "thinking"),
        (lambda: tiny.ollama.chat("tiny-chat", messages=[{"role": "user", "content": "hi", "images": [b"\x89PNG"]}]),
         "cannot see images"),
        (lambda: tiny.ollama.chat("tiny-chat", messages=[{"role": "tool", "content": "42"}]), "tool result"),
        (lambda: tiny.ollama.chat("tiny-chat", messages=[{"role": "robot", "content": "42"}]), "role"),
        (lambda: tiny.ollama.chat("nope", messages=[{"role": "user", "content": "hi"}]), "model 'nope' not found"),
        (lambda: tiny.ollama.chat("tiny-chat", messages=[{"role": "user", "content": "word " * 2100}]), "2048"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            r = call()
            list(r) if not hasattr(r, "done") else r
        assert e.value.status_code in (400, 404) and words in e.value.error, (words, e.value.error)
    assert math.isfinite(tiny.metrics()["requests_total"])  # still serving


def test_format_json_and_schema(tiny):
    from gemma3_mlx.cli.serve_ollama import constraint
    from gemma3_mlx.constrain import Constraint

    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["age", "ok"], "additionalProperties": False}
    assert constraint("json") == Constraint.json_object()
    assert constraint(schema) == Constraint.json_schema(schema)
    assert constraint(None) is None and constraint("") is None
    for stream in (False, True):
        r = tiny.ollama.chat("tiny-chat", messages=[{"role": "user", "content": "How old? JSON."}], format=schema,
                             options={"num_predict": 60}, stream=stream)
        parts = list(r) if stream else [r]
        text = "".join(p.message.content for p in parts)
        if parts[-1].done_reason == "stop":  # the object closed: it validates
            got = json.loads(text)
            assert isinstance(got["age"], int) and isinstance(got["ok"], bool) and set(got) == {"age", "ok"}
        else:  # out of tokens inside the object (a random model may write digits for ever): a prefix of one
            assert text.startswith('{"age": ') and text[8:].lstrip("-").split(",")[0].isdigit(), text
    r = tiny.ollama.generate("tiny-chat", "Some JSON please.", format="json", options={"num_predict": 30})
    assert r.response.startswith("{") and r.eval_count <= 30
    with pytest.raises(ollama.ResponseError) as e:
        tiny.ollama.generate("tiny-chat", "x", format={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    assert e.value.status_code == 400 and e.value.error.startswith("format: "), e.value.error
    status, body = tiny.raw("POST", "/api/generate", json.dumps({"model": "tiny-chat", "prompt": "x", "format": "yaml"}))
    assert status == 400 and body == {"error": 'format: expected "json" or a JSON schema object'}


def test_images_as_ollama_sends_them(tiny, tmp_path):
    """Base64 without a data: prefix, in a message's "images" (chat) or the body's (generate): the image goes
    before the message's text, as Ollama places it; the same prompt and reply as the OpenAI route's."""
    import base64

    from conftest import FIXTURES, give_eyes
    from gemma3_mlx.prompt import MARKER, prompt_ids

    seeing = Tiny(give_eyes(tiny.path, tmp_path / "tiny-eyes"))
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{seeing.port}", headers={"Authorization": f"Bearer {KEY}"})
        png = (FIXTURES / "images" / "rgb.png").read_bytes()
        ids, blocks = prompt_ids(seeing.tokenizer, seeing.model.config,
                                 [{"role": "user", "content": MARKER + "What is this?"}], [png])
        r = client.chat("tiny-eyes", messages=[{"role": "user", "content": "What is this?", "images": [png]}],
                        options={"num_predict": 6})
        assert r.prompt_eval_count == len(ids) and len(blocks) == 1 and r.eval_count == 6
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        openai_reply = seeing.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": "What is this?"}]}],
                                   max_tokens=6)
        assert r.message.content == openai_reply.choices[0].message.content
        g = client.generate("tiny-eyes", "What is this?", images=[base64.b64encode(png).decode()],
                            options={"num_predict": 6})
        assert g.response == r.message.content and g.prompt_eval_count == len(ids)
        status, body = seeing.raw("POST", "/api/generate", json.dumps({"model": "tiny-eyes", "prompt": "x",
                                                                       "images": [url]}))  # a data: URL is not base64
        assert status == 400 and "not valid base64" in body["error"]
    finally:
        seeing.close()


def test_tools_as_ollama_sends_them(tokenizer_270m, tmp_path_factory):
    """/api/chat with tools: the calls (arguments an object) are the OpenAI route's calls for the same
    conversation, whole and streamed, and valid against their schemas; a conversation with Ollama's calls
    and `tool_name` results gives the OpenAI route's prompt (the same length) and reply."""
    import jsonschema

    from test_structured import CONVERT, SCHEMAS, WEATHER, jsonish

    # JSON punctuation likely, and an opening "{" or "[" first even where text may come (Ollama's tools are "auto")
    server = Tiny(jsonish(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("ollama") / "tiny-json"), opener=30.0))
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{server.port}", headers={"Authorization": f"Bearer {KEY}"},
                               timeout=120)
        tools, ask = [WEATHER, CONVERT], [{"role": "user", "content": "Go"}]
        # What the official client sends: its Tool model keeps type/enum/required/description of each
        # property and drops the rest (maxLength, minimum, additionalProperties); the OpenAI route gets that.
        sent = [ollama.Tool.model_validate(t).model_dump(exclude_none=True, by_alias=True) for t in tools]
        assert "maxLength" not in json.dumps(sent) and "maxLength" in json.dumps(tools)
        r = client.chat("tiny-json", messages=ask, tools=tools, options={"num_predict": 120, "temperature": 0})
        calls = [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls or ()]
        assert calls and r.message.content == "" and r.done_reason == "stop", r
        for name, args in calls:
            jsonschema.validate(args, next(t["function"]["parameters"] for t in sent if t["function"]["name"] == name))
            assert set(args) == set(SCHEMAS[name]["required"])
        tools = sent
        oa = server.chat(ask, tools=tools, max_tokens=120).choices[0].message
        assert [(c.function.name, json.loads(c.function.arguments)) for c in oa.tool_calls] == calls
        parts = list(client.chat("tiny-json", messages=ask, tools=tools, options={"num_predict": 120}, stream=True))
        assert [(c.function.name, dict(c.function.arguments)) for p in parts for c in p.message.tool_calls or ()] == calls
        assert "".join(p.message.content for p in parts) == "" and parts[-1].done_reason == "stop"
        # The results, in the other order, each naming its tool; the OpenAI route gets the same by call id.
        results = [{"role": "tool", "content": f"result {i}", "tool_name": name} for i, (name, _) in enumerate(calls)][::-1]
        made = {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": n, "arguments": a}} for n, a in calls]}
        r2 = client.chat("tiny-json", messages=[*ask, made, *results], tools=tools, options={"num_predict": 8})
        ids = [f"call_{i}" for i in range(len(calls))]
        oa_made = {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
            for i, (n, a) in zip(ids, calls)]}
        by_id = [{"role": "tool", "tool_call_id": ids[len(calls) - 1 - k], "content": t["content"]} for k, t in enumerate(results)]
        oa2 = server.chat([*ask, oa_made, *by_id], tools=tools, max_tokens=8)
        assert r2.prompt_eval_count == oa2.usage.prompt_tokens
        got = r2.message.content or json.dumps([dict(c.function.arguments) for c in r2.message.tool_calls])
        want = oa2.choices[0].message.content or json.dumps([json.loads(c.function.arguments)
                                                              for c in oa2.choices[0].message.tool_calls])
        assert got == want
        for body, words in (
            ({"messages": ask, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
             "tools"),
            ({"messages": ask, "tools": tools, "format": "json"}, "format: cannot be combined with tools"),
            ({"messages": [*ask, made, {"role": "tool", "content": "x", "tool_name": "nope"}], "tools": tools},
             "tool result of 'nope'"),
            ({"messages": [*ask, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "x"}}]}]},
             "tool_calls[0]"),
        ):
            status, answer = server.raw("POST", "/api/chat", json.dumps({"model": "tiny-json", "stream": False, **body}))
            assert status == 400 and words in answer["error"], (words, answer)
        status, answer = server.raw("POST", "/api/generate", json.dumps({"model": "tiny-json", "prompt": "hi", "tools": tools}))
        assert status == 400 and "/api/generate takes no tools" in answer["error"]
    finally:
        server.close()
