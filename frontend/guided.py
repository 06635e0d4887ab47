"""OpenAI and vLLM structured-output fields -> the router's `structured_outputs` input.

Called by `frontend.protocol` (validation, and once per router request in `_sampling`) on
the event loop. A request constrains its output through at most one of:

- `response_format`: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (OpenAI; chat and completions alike);
- vLLM's extras: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, or
  `structured_outputs` (`{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`);
- `tool_choice` `"required"` or a named function (`frontend.tools`), whose arguments are
  constrained by the functions' parameter schemas.

Errors are 400s naming the field as the client spelled it; a schema the engine cannot
compile comes back from the router as `structured_outputs.<kind>`, renamed by `param_map`.
"""

from __future__ import annotations

import json
from typing import Any

from frontend.errors import invalid_request
from trident.core.errors import ValidationError
from trident.core.structured import KINDS, parse_structured_outputs, structured_outputs_text

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _response_format(value: Any) -> tuple[str, str, Any] | None:
    """(client field, kind, value) of `response_format`, None for text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_request("response_format: must be an object", param="response_format")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", "json_object", True
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid_request(
                "response_format.json_schema: is required with type 'json_schema' (an object with name and schema)",
                param="response_format.json_schema",
            )
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise invalid_request(
                "response_format.json_schema.schema: must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        if not isinstance(spec.get("name", ""), str):
            raise invalid_request(
                "response_format.json_schema.name: must be a string",
                param="response_format.json_schema.name",
            )
        return "response_format.json_schema.schema", "json", schema
    raise invalid_request(
        f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format.type",
    )


def _extras(extra: dict[str, Any]) -> list[tuple[str, str, Any]]:
    found = []
    for name, kind in _GUIDED.items():
        if extra.get(name) is not None:
            found.append((name, kind, extra[name]))
    spec = extra.get("structured_outputs")
    if spec is not None:
        if not isinstance(spec, dict):
            raise invalid_request(
                "structured_outputs: must be an object", param="structured_outputs"
            )
        given = [k for k in KINDS if spec.get(k) not in (None, False)]
        if len(given) != 1:
            raise invalid_request(
                f"structured_outputs: set exactly one of {', '.join(KINDS)}",
                param="structured_outputs",
            )
        found.append((f"structured_outputs.{given[0]}", given[0], spec[given[0]]))
    return found


def constraint_of(
    req: Any, tool_spec: tuple[str, str, Any] | None = None
) -> tuple[str, str] | None:
    """(client field, `structured_outputs` JSON) of the request, or None when unconstrained.

    `tool_spec` is `frontend.tools.ToolPlan.constraint()`: (field, kind, value) for
    tool_choice required or named. More than one source is a 400 naming the second.
    """
    sources = []
    fmt = _response_format(getattr(req, "response_format", None))
    if fmt is not None:
        sources.append(fmt)
    sources.extend(_extras(req.model_extra or {}))
    if tool_spec is not None:
        sources.append(tool_spec)
    if not sources:
        return None
    if len(sources) > 1:
        field = sources[1][0].split(".")[0]
        raise invalid_request(
            f"{field}: cannot be combined with {sources[0][0].split('.')[0]} (one output constraint per request)",
            param=field,
        )
    field, kind, value = sources[0]
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise invalid_request(
                f"{field}: the schema is not valid JSON: {exc}", param=field
            ) from None
    text = structured_outputs_text(kind, value)
    try:
        parse_structured_outputs(text)
    except ValidationError as exc:
        raise invalid_request(f"{field}: {exc.message}", param=field) from None
    return field, text


def param_map_of(field: str | None) -> dict[str, str]:
    """Router error fields (`structured_outputs.<kind>`) -> the client's field."""
    if field is None:
        return {}
    return {"structured_outputs": field, **{f"structured_outputs.{k}": field for k in KINDS}}
