"""The tool-call parser and the structured-output field mapping, without a server: every way
of feeding a choice's text (whole, or piece by piece) gives the same calls, and bad tools,
tool choices and response formats are 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from frontend.errors import APIError
from frontend.protocol import ChatCompletionRequest, CompletionRequest, guided_constraint, tool_plan
from frontend.tools import ToolCallParser, collect, plan_tools, tool_finish_reason

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _streamed(parser: ToolCallParser, pieces: list[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """Merge streamed deltas as an OpenAI client does."""
    content, calls = [], []
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    for delta in deltas:
        if "content" in delta:
            content.append(delta["content"])
        for piece in delta.get("tool_calls", ()):
            if "id" in piece:
                calls.append(
                    {"name": piece["function"]["name"], "arguments": piece["function"]["arguments"]}
                )
            else:
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    joined = "".join(content)
    return (None if calls and not joined.strip() else joined), calls


def _whole(parser: ToolCallParser, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    content, calls = collect(parser, text)
    return content, [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls
    ]


HERMES = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)


@pytest.mark.parametrize(
    ("choice", "name", "text", "calls"),
    [
        ("auto", None, HERMES, [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]),
        ("auto", None, "no call here, just <tool text", []),
        (
            "auto",
            None,
            '<tool_call>{"name": "get_time", "arguments": {}}',
            [("get_time", {})],
        ),  # EOS, no close tag
        (
            "required",
            None,
            '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
            '"parameters": {"city": "Oslo \\"}\\"", "unit": "F"}}]',
            [("get_time", {}), ("get_weather", {"city": 'Oslo "}"', "unit": "F"})],
        ),
        (
            "named",
            "get_weather",
            '{"city": "Rome", "unit": "C"}',
            [("get_weather", {"city": "Rome", "unit": "C"})],
        ),
    ],
)
def test_streamed_deltas_concatenate_to_the_whole_call(choice, name, text, calls) -> None:
    whole = _whole(ToolCallParser(choice, name), text)
    assert [(c["name"], json.loads(c["arguments"])) for c in whole[1]] == calls
    for size in (1, 2, 5, 11, len(text)):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert _streamed(ToolCallParser(choice, name), pieces) == whole, size
    if not calls:
        assert whole[0] == text


def test_content_around_calls_and_finish_reason() -> None:
    parser = ToolCallParser("auto")
    content, calls = collect(parser, HERMES)
    assert content == "Let me check. " and len(calls) == 2 and calls[0]["id"].startswith("call_")
    assert tool_finish_reason(parser, "stop") == "tool_calls"
    assert tool_finish_reason(parser, "length") == "length"
    plain = ToolCallParser("auto")
    assert collect(plain, "hello") == ("hello", []) and tool_finish_reason(plain, "stop") == "stop"
    broken = ToolCallParser("auto")
    assert collect(broken, "<tool_call>{not json}</tool_call>") == (
        "<tool_call>{not json}</tool_call>",
        [],
    )


def test_required_and_named_schemas_accept_only_calls() -> None:
    plan = plan_tools([WEATHER, TIME], "required")
    assert plan is not None
    _, kind, schema = plan.constraint()
    assert kind == "json"
    jsonschema.validate([{"name": "get_time", "parameters": {}}], schema)
    for bad in (
        [],
        [{"name": "other", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"city": "x"}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools([WEATHER, TIME], "required", parallel_tool_calls=False).constraint()[2]
    assert single["maxItems"] == 1
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.constraint() == ("tool_choice", "json", WEATHER["function"]["parameters"])
    assert plan_tools([WEATHER], None).choice == "auto" and plan_tools(None, None) is None


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [TIME, TIME]}, "tools"),
        ({"tools": []}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TIME], "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [TIME], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        (
            {
                "tools": [TIME],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{oops"}, "guided_json"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ],
)
def test_bad_tool_and_format_fields_are_named(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        guided_constraint(_chat(**fields))
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_constraints_map_onto_structured_outputs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert guided_constraint(_chat(response_format=fmt)) == (
        "response_format.json_schema.schema",
        json.dumps({"json": schema}, separators=(",", ":")),
    )
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "guided_choice": ["a", "b"]}
    )
    assert guided_constraint(completion) == ("guided_choice", '{"choice":["a","b"]}')
    assert guided_constraint(_chat(structured_outputs={"regex": "[0-9]+"})) == (
        "structured_outputs.regex",
        '{"regex":"[0-9]+"}',
    )
    assert guided_constraint(_chat(response_format={"type": "text"})) is None
    assert tool_plan(_chat(tools=[TIME], tool_choice="none")).constraint() is None
