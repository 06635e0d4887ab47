"""Tool calling for chat completions: `tools` / `tool_choice` in, `tool_calls` out.

Called on the event loop by `frontend.protocol` (`plan_tools`, when validating a chat
request) and by `frontend.serving` (`ResponseShape.tools`: one `ToolCallParser` per choice,
fed the choice's text as it arrives, streamed or not, so that the streamed deltas always
concatenate to the non-streamed call).

As in vLLM: the tools go to the chat template as `tools` (the router's `tools` input); a
template that does not render them leaves the model unaware of them, and then only
`tool_choice` `"required"` or a named function (both enforced by structured outputs) make
calls. Per `tool_choice`:

- `"none"`: tools are rendered, the output is plain content;
- `"auto"` (the default with tools): Hermes-style output, `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` (the format of SmolLM, Qwen and Hermes templates), is
  parsed into calls; text outside the tags is content;
- `"required"`: the output is constrained to a JSON array of `{"name", "parameters"}` with
  one of the functions' names and its parameter schema (vLLM's schema; one item when
  `parallel_tool_calls` is false);
- `{"type": "function", "function": {"name": ...}}`: the output is constrained to that
  function's parameters; it is the call's `arguments`, streamed as it is generated.

A choice that made calls ends with `finish_reason` "tool_calls" (unless cut by length).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import invalid_request

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What one chat request does with tools: `choice` is none | auto | required | named."""

    choice: str
    tools: tuple[dict[str, Any], ...]  # as the client sent them (for the chat template)
    functions: tuple[dict[str, Any], ...]  # each {"name", "parameters"}
    name: str | None = None  # the named function
    parallel: bool = True

    def constraint(self) -> tuple[str, str, Any] | None:
        """(client field, structured-outputs kind, value) for required / named, else None."""
        if self.choice == "named":
            fn = next(f for f in self.functions if f["name"] == self.name)
            return "tool_choice", "json", fn["parameters"]
        if self.choice != "required":
            return None
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [f["name"]]},
                    "parameters": f["parameters"],
                },
                "required": ["name", "parameters"],
            }
            for f in self.functions
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return "tool_choice", "json", schema

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.choice, self.name)


def plan_tools(
    tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: Any = None
) -> ToolPlan | None:
    """Validate `tools` and `tool_choice`; None when the request has no tools."""
    if tools is not None and not isinstance(tools, list):
        raise invalid_request("tools: must be an array of tool objects", param="tools")
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid_request("tool_choice: requires tools", param="tool_choice")
        if tools is not None:
            raise invalid_request("tools: must not be empty (leave it out instead)", param="tools")
        return None
    functions = tuple(_function(i, tool) for i, tool in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise invalid_request("tools: function names must be unique", param="tools")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise invalid_request("parallel_tool_calls: must be a boolean", param="parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return ToolPlan(tool_choice or "auto", tuple(tools), functions, parallel=parallel)
    if isinstance(tool_choice, str):
        raise invalid_request(
            f"tool_choice: must be 'none', 'auto', 'required' or a function, got {tool_choice!r}",
            param="tool_choice",
        )
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (
        not isinstance(tool_choice, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(fn, dict)
    ):
        raise invalid_request(
            'tool_choice: a named choice is {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if fn.get("name") not in names:
        raise invalid_request(
            f"tool_choice.function.name: {fn.get('name')!r} is not one of the tools ({', '.join(names)})",
            param="tool_choice.function.name",
        )
    return ToolPlan("named", tuple(tools), functions, name=fn["name"], parallel=parallel)


def _function(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise invalid_request(
            f"{where}.type: only 'function' tools are supported", param=f"{where}.type"
        )
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise invalid_request(f"{where}.function: must be an object", param=f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid_request(
            f"{where}.function.name: must be 1-64 letters, digits, '_', '.' or '-'",
            param=f"{where}.function.name",
        )
    params = fn.get("parameters", _EMPTY_PARAMS)
    if not isinstance(params, dict):
        raise invalid_request(
            f"{where}.function.parameters: must be a JSON schema object",
            param=f"{where}.function.parameters",
        )
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise invalid_request(
            f"{where}.function.description: must be a string", param=f"{where}.function.description"
        )
    return {"name": name, "parameters": params or _EMPTY_PARAMS}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallParser:
    """Turns one choice's text, fed in pieces, into OpenAI message deltas: `{"content": s}`
    or `{"tool_calls": [{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}]}`."""

    choice: str
    name: str | None = None
    calls: int = 0
    _buffer: str = ""
    _in_call: bool = False
    _scan: int = 0  # required: scanner position, depth, string state, start of the item
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _item: int = -1
    _raw: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self.choice == "named":
            out = [] if self.calls else [self._call(self.name or "", "")]
            return [*out, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        if self.choice == "required":
            return self._feed_array(text)
        if self.choice == "auto":
            return self._feed_tags(text)
        return [{"content": text}]

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of text held back, at the end of the choice."""
        rest, self._buffer = self._buffer, ""
        if self.choice == "required":
            return [] if self.calls else [{"content": "".join(self._raw)}] if self._raw else []
        if self.choice != "auto" or not rest:
            return []
        if self._in_call:  # an unterminated last call: a call if it parses, else text
            self._in_call = False
            call = self._parse_call(rest)
            return [call] if call is not None else [{"content": _OPEN + rest}]
        return [{"content": rest}]

    def _call(self, name: str, arguments: str) -> dict[str, Any]:
        index = self.calls
        self.calls += 1
        fn = {"name": name, "arguments": arguments}
        return {
            "tool_calls": [
                {"index": index, "id": new_call_id(), "type": "function", "function": fn}
            ]
        }

    def _parse_call(self, body: str) -> dict[str, Any] | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        args = value.get("arguments", value.get("parameters", {}))
        return self._call(
            value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        )

    def _feed_tags(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        out: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buffer.find(_CLOSE)
                if end < 0:
                    return out
                body, self._buffer = self._buffer[:end], self._buffer[end + len(_CLOSE) :]
                self._in_call = False
                call = self._parse_call(body)
                out.append(call if call is not None else {"content": _OPEN + body + _CLOSE})
                continue
            start = self._buffer.find(_OPEN)
            if start >= 0:
                if start:
                    out.append({"content": self._buffer[:start]})
                self._buffer = self._buffer[start + len(_OPEN) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, _OPEN)
            emit = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(emit) :]
            if emit:
                out.append({"content": emit})
            return out

    def _feed_array(self, text: str) -> list[dict[str, Any]]:
        """A JSON array of {"name", "parameters"}: each item becomes a call once it closes."""
        self._raw.append(text)
        self._buffer += text
        out = []
        buf = self._buffer
        for i in range(self._scan, len(buf)):
            c = buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "[{":
                self._depth += 1
                if self._depth == 2 and c == "{":
                    self._item = i
            elif c in "]}":
                self._depth -= 1
                if self._depth == 1 and c == "}" and self._item >= 0:
                    call = self._parse_call(buf[self._item : i + 1])
                    self._item = -1
                    if call is not None:
                        out.append(call)
        self._scan = len(buf)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back: it may be a tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def collect(parser: ToolCallParser, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The whole choice at once: (content or None, tool_calls), from the same parser the
    streamed deltas come from (so both agree)."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for delta in [*parser.feed(text), *parser.finish()]:
        if "content" in delta:
            content.append(delta["content"])
        for piece in delta.get("tool_calls", ()):
            if "id" in piece:
                calls.append(
                    {"id": piece["id"], "type": "function", "function": dict(piece["function"])}
                )
            else:
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    joined = "".join(content)
    return (None if calls and not joined.strip() else joined), calls


def tool_finish_reason(parser: ToolCallParser, reason: str | None) -> str | None:
    """OpenAI's "tool_calls" for a choice that ended normally after making calls."""
    return "tool_calls" if parser.calls and reason == "stop" else reason


def message_fields(index: int, role: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The tool fields of a chat message, for the template: an assistant's `tool_calls`, a
    tool message's `tool_call_id` (a tool message needs one)."""
    extra = extra or {}
    where = f"messages[{index}]"
    out: dict[str, Any] = {}
    if role == "assistant" and extra.get("tool_calls") is not None:
        calls = extra["tool_calls"]
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise invalid_request(
                f"{where}.tool_calls: must be an array of objects", param=f"{where}.tool_calls"
            )
        out["tool_calls"] = calls
    if role == "tool":
        call_id = extra.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid_request(
                f"{where}.tool_call_id: is required for role 'tool'", param=f"{where}.tool_call_id"
            )
        out["tool_call_id"] = call_id
    return out
