"""Structured outputs and tool calls end to end: the official `openai` client against our
frontend and the session's real tritonserver (router + decode workers on SmolLM2-135M),
and the router's own `structured_outputs` input over Triton's generate endpoint.

Every JSON-schema answer must parse and validate against its schema; regex and choice
answers must match; tool calls must parse, and streamed tool-call deltas must concatenate
to the non-streamed call (greedy decoding makes the two runs generate the same tokens).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest

from tests.frontend.conftest import MODEL_ID
from tests.integration.helpers import generate, generate_stream
from tests.integration.server_fixture import ServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_required": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["color", "sure"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"type": "string", "maxLength": 10},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "tags": {
                "type": "array",
                "items": {"enum": ["old", "big", "cold"]},
                "maxItems": 2,
            },
        },
        "required": ["city", "location", "tags"],
        "additionalProperties": False,
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for temperature, seed in ((0.0, None), (1.0, 7)):
        out = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": f"Reply with JSON ({name.replace('_', ' ')})."}],
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=200,
            temperature=temperature,
            seed=seed,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_and_completions(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    else:  # a free-form object may run past max_tokens: still a JSON object's beginning
        assert (out.choices[0].message.content or "").startswith("{")
    schema = SCHEMAS["enum"]
    done = client.completions.create(
        model=MODEL_ID,
        prompt="The sky's color as JSON:",
        max_tokens=60,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema},
            }
        },
    )
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    choice = client.completions.create(
        model=MODEL_ID,
        prompt="Answer yes or no: is fire hot?",
        max_tokens=10,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].text in ("yes", "no")


def test_regex_and_choice_through_router_inputs(triton_server: ServerInfo) -> None:
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,2}"
    for i in range(3):
        resp = generate(
            triton_server.http_url,
            text_input="Name a month and a day:",
            max_tokens=20,
            temperature=1.0,
            seed=i,
            structured_outputs=json.dumps({"regex": pattern}),
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["finish_reason"] == "stop" and re.fullmatch(pattern, body["text_output"]), body
    events = generate_stream(
        triton_server.http_url,
        messages=json.dumps([{"role": "user", "content": "Pick a fruit."}]),
        max_tokens=10,
        stream=True,
        structured_outputs=json.dumps({"choice": ["apple", "banana split", "cherry"]}),
    )
    assert "".join(e["text_output"] for e in events) in ("apple", "banana split", "cherry")
    assert events[-1]["finish_reason"] == "stop"
    bad = generate(
        triton_server.http_url,
        text_input="x",
        structured_outputs=json.dumps({"regex": "(unclosed"}),
    )
    assert bad.status_code == 400 and "structured_outputs.regex" in bad.json()["error"], bad.text


def _stream_calls(client: openai.OpenAI, **kw: Any) -> tuple[list[dict[str, str]], str | None, str]:
    """Tool calls of a streamed answer, merged from their deltas as a client does."""
    calls: list[dict[str, str]] = []
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or ():
            if piece.id:
                assert piece.index == len(calls) and piece.type == "function"
                calls.append(
                    {"name": piece.function.name or "", "arguments": piece.function.arguments or ""}
                )
            else:
                calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, finish, content


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_calls_parse_and_stream_alike(client: openai.OpenAI, tool_choice: Any) -> None:
    kw = dict(
        model=MODEL_ID,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=120,
        temperature=0,
    )
    out = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
    assert not choice.message.content
    whole = []
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        fn = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
        jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
        whole.append({"name": call.function.name, "arguments": call.function.arguments})
    if isinstance(tool_choice, dict):
        assert [c["name"] for c in whole] == ["get_weather"]
    streamed, finish, content = _stream_calls(client, **kw)
    assert streamed == whole and finish == "tool_calls" and not content


def test_tool_choice_auto_and_none_answer_in_text(client: openai.OpenAI) -> None:
    for tool_choice in ("auto", "none"):
        out = client.chat.completions.create(
            model=MODEL_ID,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=tool_choice,
            max_tokens=16,
            temperature=0,
        )
        choice = out.choices[0]
        # SmolLM2-135M's template does not render tools, so the model answers in text.
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert not choice.message.tool_calls
    followup = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    out = client.chat.completions.create(
        model=MODEL_ID, messages=followup, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert out.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_unsupported_combinations_are_400s_naming_the_field(
    client: openai.OpenAI, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body  # type: ignore[index]
