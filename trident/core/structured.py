"""The `structured_outputs` request field: what a constrained generation must match.

It travels as JSON text (the `structured_outputs` input of the router and the workers, and
`SamplingParams.structured_outputs`) holding exactly one of vLLM's `StructuredOutputsParams`
kinds:

- `{"json": <JSON schema object, or its JSON text>}`: output is JSON valid for the schema;
- `{"json_object": true}`: output is any JSON object;
- `{"regex": "<pattern>"}`: output matches the regular expression;
- `{"choice": ["a", "b", ...]}`: output is exactly one of the strings;
- `{"grammar": "<EBNF>"}`: output is in the grammar (GBNF, as xgrammar and llama.cpp read it).

`parse_structured_outputs` checks the shape only (called by `SamplingParams.validate` on
every hop); whether a schema or a pattern compiles is for the engine to say (the torch
engine's `plugins.torch_engine.grammar`), with the same field name in its error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trident.core.errors import ValidationError

FIELD = "structured_outputs"
KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_BYTES = 256 * 1024  # a schema larger than this is refused before any compile


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """A parsed spec: `kind` one of KINDS, `value` the schema text (json, compact), pattern,
    choices tuple or grammar text; `key` the canonical text (a compiled-grammar cache key)."""

    kind: str
    value: Any
    key: str


def parse_structured_outputs(text: str) -> StructuredSpec:
    """The spec in `text`; `ValidationError` naming `structured_outputs` when malformed."""
    if not isinstance(text, str) or not text:
        raise ValidationError(FIELD, "must be non-empty JSON text")
    if len(text) > MAX_SPEC_BYTES:
        raise ValidationError(FIELD, f"is longer than {MAX_SPEC_BYTES} bytes")
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(FIELD, f"invalid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValidationError(
            FIELD, f"must be a JSON object with one of the keys {', '.join(KINDS)}"
        )
    given = [k for k, v in spec.items() if v is not None and v is not False]
    unknown = [k for k in given if k not in KINDS]
    if unknown:
        raise ValidationError(
            f"{FIELD}.{unknown[0]}", f"unknown kind; the kinds are {', '.join(KINDS)}"
        )
    if len(given) != 1:
        raise ValidationError(
            FIELD, f"must set exactly one of {', '.join(KINDS)} (got {len(given)})"
        )
    kind = given[0]
    value = spec[kind]
    where = f"{FIELD}.{kind}"
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise ValidationError(where, f"the schema is not valid JSON: {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise ValidationError(where, "must be a JSON schema (an object)")
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    elif kind == "json_object":
        if value is not True:
            raise ValidationError(where, "must be true")
    elif kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise ValidationError(where, "must be a non-empty string")
    else:  # choice
        if not isinstance(value, list) or not value:
            raise ValidationError(where, "must be a non-empty list of strings")
        if any(not isinstance(c, str) or not c for c in value):
            raise ValidationError(where, "must hold non-empty strings only")
        value = tuple(value)
    key = json.dumps(
        [kind, list(value) if isinstance(value, tuple) else value], separators=(",", ":")
    )
    return StructuredSpec(kind, value, key)


def structured_outputs_text(kind: str, value: Any) -> str:
    """The JSON text of a spec of `kind` (callers: the OpenAI frontend, benchmarks, tests)."""
    if kind not in KINDS:
        raise ValidationError(FIELD, f"unknown kind {kind!r}")
    return json.dumps({kind: value}, ensure_ascii=False, separators=(",", ":"))
