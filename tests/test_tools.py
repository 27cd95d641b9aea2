"""Tool calls at the library level: the grammars each tool_choice makes (checked by replaying texts
through a fresh matcher), parsing a reply into calls with the arguments exactly as written, the
conversation rendered back (calls as generated, results as <tool_response> turns), and refusals."""

import json

import llguidance
import pytest

import gemma3_mlx  # noqa: F401
from gemma3_mlx.constrain import vocabulary
from gemma3_mlx.tokenizer import Tokenizer
from gemma3_mlx.tools import ToolError, ToolUse, call_text, chat_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tok(tokenizer_270m):
    return Tokenizer(tokenizer_270m)


def accepts(tok, use, text) -> bool:
    """Whether a fresh matcher of the choice's grammar takes `text` whole and may end there."""
    m = llguidance.LLMatcher(vocabulary(tok, 262144).lltok, use.constraint().compiled, log_level=0)
    ids = tok.encode(text, add_bos=False)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'
TWO = '[' + CALL + ', {"name": "now", "parameters": {}}]'


@pytest.mark.parametrize("choice, parallel, text, ok", [
    ("auto", True, "It is sunny in Paris.", True),
    ("auto", True, CALL, True),
    ("auto", True, "\n" + CALL, True),
    ("auto", True, TWO, True),
    ("auto", False, TWO, False),
    ("auto", True, '{"name": "get_weather", "parameters": {"city": 3}}', False),  # arguments must validate
    ("auto", True, '{"not": "a call"}', False),  # text may not open with {
    ("required", True, "It is sunny.", False),
    ("required", True, CALL, True),
    ("required", False, CALL, True),
    ("now", True, CALL, False),  # the named tool only
    ("now", True, '{"name": "now", "parameters": {}}', True),
])
def test_each_choice_allows_what_it_should(tok, choice, parallel, text, ok):
    use = ToolUse.from_request([WEATHER, TIME], {"type": "function", "function": {"name": choice}}
                               if choice == "now" else choice, parallel)
    assert accepts(tok, use, text) is ok


def test_none_has_no_grammar_and_the_prompt_does_not_depend_on_the_choice():
    uses = [ToolUse.from_request([WEATHER, TIME], c, p) for c in ("auto", "required", "none") for p in (True, False)]
    assert uses[4].constraint() is None and uses[4].parse(CALL) is None
    assert len({u.instructions() for u in uses}) == 1
    assert json.dumps(WEATHER["function"]["parameters"]) in uses[0].instructions()


def test_parse_keeps_the_arguments_as_written_and_renders_the_reply_back_exactly():
    use = ToolUse.from_request([WEATHER, TIME])
    odd = '{"name": "get_weather", "parameters": {"days": 2.50, "city": "Z\\u00fcrich"}}'  # as a model may write
    for text in (CALL, TWO, odd):
        calls = use.parse(text)
        assert [json.loads(c["arguments"]) for c in calls] == [
            c["parameters"] for c in (json.loads(text) if text.startswith("[") else [json.loads(text)])]
        assert call_text(calls) == text  # what the next request renders: the cache still matches
        assert len({c["id"] for c in calls}) == len(calls)
    assert use.parse("Sunny.") is None and use.parse('{"name": "nope", "parameters": {}}') is None
    assert use.parse('{"name": "get_weather", "parameters": {"ci') is None  # cut off: left as text


def test_a_conversation_with_calls_and_results_becomes_plain_turns():
    use = ToolUse.from_request([WEATHER])
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}, {"role": "user", "content": "And?"}]
    out = chat_messages(msgs, use)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + use.instructions()
    assert out[2]["content"] == '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert out[3]["content"] == "<tool_response>\n-3 C\n</tool_response>\nAnd?"
    with pytest.raises(ToolError, match="no earlier assistant message called"):
        chat_messages(msgs[:3] + [{"role": "tool", "tool_call_id": "call_2", "content": "x"}], use)
    with pytest.raises(ToolError, match="not JSON"):
        chat_messages(msgs[:2] + [{"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "get_weather", "arguments": "{oops"}}]}], use)


@pytest.mark.parametrize("tools, choice, why", [
    ([], None, "non-empty"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "name"),
    ([WEATHER, WEATHER], None, "twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "parameters"),
    ([{"type": "retrieval"}], None, "function"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "other"}}, "other"),
])
def test_bad_tools_are_refused_naming_what(tools, choice, why):
    with pytest.raises(ToolError, match=why):
        ToolUse.from_request(tools, choice)


def test_chat_session_calls_a_tool_and_continues_from_its_cache(tokenizer_270m, tmp_path):
    """ChatSession with tools: a required call validates; its result goes back with send_tool_results,
    and the next reply processes only the result's turn (the call stays in the cache as generated)."""
    import jsonschema

    from gemma3_mlx import ChatSession, load
    from test_server import make_tiny
    from test_structured import jsonish

    model, tok = load(jsonish(make_tiny(tokenizer_270m, tmp_path / "tiny-json")))
    chat = ChatSession(model, tok, system="You help with weather.", tools=[WEATHER], tool_choice="required",
                       parallel_tool_calls=False, max_tokens=40)
    list(chat.send("Oslo?"))
    calls = chat.calls
    assert calls and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    held = chat.last.prompt_tokens + chat.last.generation_tokens  # the conversation so far, in the cache
    chat.tools = ToolUse.from_request([WEATHER], "none")  # answer in text now (the prompt stays the same)
    chat.set(max_tokens=3)
    list(chat.send_tool_results({calls[0]["id"]: '{"temp_c": -3}'}))
    assert chat.last.prompt_tokens - chat.last.prefill_tokens == held
    with pytest.raises(ValueError, match="no call"):
        chat.send_tool_results({"call_nope": "x"})
