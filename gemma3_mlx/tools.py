"""Tool calls for Gemma 3, in Google's documented prompt format (JSON variant).

Gemma 3 has no tool tokens: the tools' JSON schemas go into the first user turn (after the system
prompt) with an instruction to answer either in plain text or with only a call,
`{"name": NAME, "parameters": {...}}`, or a list of them for parallel calls. `ToolUse` holds the
tools and the choice (OpenAI's `tool_choice`): its `constraint()` makes every call's arguments match
its tool's `parameters` schema ("required" or a named tool: a call must come; "auto": text, or a call
once the reply opens with `{`/`[`), `parse()` reads a reply back into calls, and `chat_messages()`
renders a conversation with assistant `tool_calls` and `role: "tool"` results back into the plain
turns the chat format knows, writing each call exactly as the model wrote it (so a conversation's
prompt cache still matches: nothing is re-processed). No sampling, no I/O here.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .constrain import JSON_OPTIONS, Constraint

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_TOOLS = 128
CHOICES = ("auto", "required", "none")


class ToolError(ValueError):
    """Tools or tool messages that cannot be used: the message says which and why."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object

    def declaration(self) -> dict:
        """The tool as the prompt shows it."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def call_schema(self) -> dict:
        return {"type": "object", "properties": {"name": {"const": self.name}, "parameters": self.parameters},
                "required": ["name", "parameters"], "additionalProperties": False}


def parse_tools(tools) -> tuple[Tool, ...]:
    """OpenAI's `tools` ([{"type": "function", "function": {name, description, parameters}}]), or the
    bare function objects, checked: names unique and plain, `parameters` a JSON schema of an object."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools: expected a non-empty array")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools: at most {MAX_TOOLS} tools (got {len(tools)})")
    out, seen = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ToolError(f"tools[{i}]: expected an object")
        if "function" in t or t.get("type") == "function":
            if t.get("type", "function") != "function":
                raise ToolError(f"tools[{i}].type: only \"function\" tools are supported")
            t = t.get("function")
            if not isinstance(t, dict):
                raise ToolError(f"tools[{i}].function: expected an object")
        name, desc, params = t.get("name"), t.get("description", ""), t.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"tools[{i}].function.name: expected a name of letters, digits, _ . - (got {name!r:.60})")
        if name in seen:
            raise ToolError(f"tools[{i}].function.name: {name!r} is declared twice")
        if not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description: expected a string")
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"tools[{i}].function.parameters: expected a JSON schema of an object")
        seen.add(name)
        out.append(Tool(name, desc, params))
    return tuple(out)


@dataclass(frozen=True)
class ToolUse:
    tools: tuple[Tool, ...]
    choice: str = "auto"  # "auto", "required", "none", or a tool's name
    parallel: bool = True  # several calls at once (a list) allowed

    @classmethod
    def from_request(cls, tools, tool_choice=None, parallel_tool_calls=None) -> "ToolUse":
        """From OpenAI's parameters (`tool_choice` as "auto"/"required"/"none" or
        {"type": "function", "function": {"name": ...}})."""
        parsed = parse_tools(tools)
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function")
            choice = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(choice, str):
                raise ToolError('tool_choice: expected "auto", "required", "none" or {"type": "function", '
                                '"function": {"name": ...}}')
            if choice not in {t.name for t in parsed}:
                raise ToolError(f"tool_choice: no tool is named {choice!r}")
        elif choice not in CHOICES:
            raise ToolError(f'tool_choice: expected "auto", "required", "none" or a named function (got {choice!r:.60})')
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls: expected a boolean")
        return cls(parsed, choice, True if parallel_tool_calls is None else parallel_tool_calls)

    @property
    def named(self) -> Tool | None:
        return next((t for t in self.tools if t.name == self.choice), None)

    def instructions(self) -> str:
        """What the prompt says about the tools (it joins the system prompt, in the first user turn).
        It depends on the tools alone, not on tool_choice or parallel_tool_calls (the grammar enforces
        those), so a conversation that changes them between turns keeps its prompt, and its cache."""
        shape = ('{"name": function name, "parameters": dictionary of argument name and its value}, or a list of '
                 'such objects to call several functions at once')
        listing = "\n".join(json.dumps(t.declaration(), ensure_ascii=False) for t in self.tools)
        return ("You have access to functions. If you decide to invoke any of the function(s), you MUST put it "
                f"in the format of\n{shape}\n\nYou SHOULD NOT include any other text in the response if you "
                f"call a function\n{listing}")

    def constraint(self) -> Constraint | None:
        """The grammar replies are held to: None for "none"."""
        if self.choice == "none":
            return None
        tools = [self.named] if self.named else self.tools
        one = {"anyOf": [t.call_schema() for t in tools]} if len(tools) > 1 else tools[0].call_schema()
        many = {"type": "array", "items": one, "minItems": 2}
        schema = {"anyOf": [one, many]} if self.parallel and not self.named else one
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        if self.choice != "auto":
            return Constraint.json_schema(schema)
        # auto: plain text that does not open with { or [, or (after optional blanks) a call
        # (at most 4 blanks before either: a small model must not pad a reply with blank lines forever)
        return Constraint.lark("start: TEXT | BLANK? call\n"
                               f"call: %json {json.dumps(schema)}\n"
                               "BLANK: /[ \\t\\n]{1,4}/\n"
                               "TEXT: /[ \\t\\n]{0,4}[^{\\[ \\t\\n][\\s\\S]*/\n")

    def parse(self, text: str) -> list[dict] | None:
        """The calls in a reply ([{"id", "name", "arguments"}], arguments as JSON text exactly as the
        model wrote them), or None when the reply is text (or an unfinished call)."""
        if self.choice == "none":
            return None
        body = text.strip()
        if not body.startswith(("{", "[")):
            return None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        names = {t.name for t in self.tools}
        calls, pos = [], body.index("{") if body.startswith("[") else 0
        for item in items:
            if not (isinstance(item, dict) and item.get("name") in names and isinstance(item.get("parameters"), dict)):
                return None
            end = pos + _span(body[pos:])
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "name": item["name"],
                          "arguments": _arguments(body[pos:end], item)})
            pos = body.find("{", end)
        return calls


class Held:
    """A reply streamed under tools: text opening with `{` or `[` (after blanks) may be a call, so it is
    held until the reply ends; any other reply goes out as it comes. Without tools nothing is held."""

    def __init__(self, use: ToolUse | None):
        self.use, self.parts = use, [] if use is not None else None

    def add(self, text: str) -> str:
        """What to send now ("" while the reply may still be a call)."""
        if self.parts is None:
            return text
        self.parts.append(text)
        joined = "".join(self.parts)
        start = joined.lstrip()[:1]
        if not start or start in "{[":
            return ""
        self.parts = None
        return joined

    def end(self) -> tuple[str, list[dict] | None]:
        """At the reply's end: (text still to send, the calls when the held reply is calls)."""
        text, self.parts = "".join(self.parts or ()), None
        calls = self.use.parse(text) if text else None
        return ("", calls) if calls else (text, None)


def _span(text: str) -> int:
    """Length of the JSON value at the start of `text`."""
    return json.JSONDecoder().raw_decode(text)[1]


def _head(name: str) -> str:
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "parameters": '


def _arguments(call_text: str, item: dict) -> str:
    """The `parameters` value as written, when the call is laid out as the grammar writes it."""
    head = _head(item["name"])
    if call_text.startswith(head) and call_text.endswith("}"):
        inner = call_text[len(head):-1]
        try:
            if json.loads(inner) == item["parameters"]:
                return inner
        except ValueError:
            pass
    return json.dumps(item["parameters"], ensure_ascii=False)


def call_text(calls: list[dict]) -> str:
    """Calls as the model writes them ([{"name", "arguments"}], arguments JSON text): one object, or
    a list of several. With the arguments as they were returned, this is the reply's exact text."""
    parts = [_head(c["name"]) + c["arguments"] + "}" for c in calls]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def chat_messages(messages: list[dict], use: ToolUse | None) -> list[dict]:
    """OpenAI-shaped messages -> plain turns: the tools' instructions join the system prompt, an
    assistant's `tool_calls` become the call's text, `role: "tool"` results (each answering a call made
    earlier) become a user turn of <tool_response> blocks, merged with any user text that follows."""
    out: list[dict] = []
    calls: dict[str, str] = {}  # id -> name of calls made so far
    if use is not None:
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = f"{first.get('content') or ''}\n\n{use.instructions()}".lstrip()
            messages = [first, *messages[1:]]
        else:
            messages = [{"role": "system", "content": use.instructions()}, *messages]
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            made = []
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") if isinstance(c, dict) else None
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
                    raise ToolError(f"messages[{i}].tool_calls[{j}]: expected {{id, type, function: {{name, arguments}}}}")
                try:
                    json.loads(fn["arguments"])
                except ValueError:
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments: not JSON") from None
                calls[str(c.get("id"))] = fn["name"]
                made.append({"name": fn["name"], "arguments": fn["arguments"]})
            out.append({**{k: v for k, v in m.items() if k != "tool_calls"}, "content": call_text(made)})
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid not in calls:
                raise ToolError(f"messages[{i}]: a tool result for {cid!r}, which no earlier assistant message called")
            content = m.get("content")
            if not isinstance(content, str):
                raise ToolError(f"messages[{i}].content: a tool result must be text")
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        elif role == "user" and out and out[-1].get("_tool"):
            out[-1] = {**m, "content": f"{out[-1]['content']}\n{m.get('content') or ''}"}
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]
