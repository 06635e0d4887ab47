"""Tensor I/O of the `router` model: its public contract, parsed and encoded without Triton.

Inputs (every one optional, but one of text_input / messages / input_ids is required):
  text_input STRING [1] (raw prompt), messages STRING [1] (chat JSON), input_ids INT32 [-1],
  max_tokens INT32 [1] (16), min_tokens INT32 [1], stream BOOL [1] (false),
  temperature FP32 [1] (1.0), top_p FP32 [1], top_k INT32 [1], seed / random_seed UINT64 [1],
  stop STRING [-1], stop_token_ids INT32 [-1], ignore_eos BOOL [1],
  exclude_input_in_output BOOL [1] (accepted; output never includes the input),
  request_id STRING [1].
Outputs (every response): text_output STRING [1], output_ids INT32 [-1], finish_reason
  STRING [1] ("" until the last), num_input_tokens, num_output_tokens (cumulative),
  cached_tokens INT32 [1], worker STRING [1].
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trident.core.errors import ValidationError
from trident.core.types import SamplingParams
from trident.core.worker_io import (
    Arrays,
    get_bool,
    get_int_list,
    get_str,
    get_str_list,
    parse_sampling,
)

ROUTER_INPUTS = (
    "text_input", "messages", "input_ids", "max_tokens", "min_tokens", "stream", "temperature",
    "top_p", "top_k", "seed", "random_seed", "stop", "stop_token_ids", "ignore_eos",
    "exclude_input_in_output", "request_id",
)
ROUTER_OUTPUTS = (
    "text_output", "output_ids", "finish_reason", "num_input_tokens", "num_output_tokens",
    "cached_tokens", "worker",
)
PROMPT_INPUTS = ("text_input", "messages", "input_ids")


@dataclass(frozen=True, slots=True)
class RouterRequest:
    """A validated client request as the orchestrator sees it (exactly one prompt form set)."""

    sampling: SamplingParams
    text_input: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    input_ids: tuple[int, ...] | None = None
    stream: bool = False
    stop: tuple[str, ...] = ()
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class RouterDelta:
    """One router response: new text and ids since the previous one (or all of it)."""

    text_output: str
    output_ids: tuple[int, ...]
    finish_reason: str  # "" until the last response
    num_input_tokens: int
    num_output_tokens: int  # cumulative
    cached_tokens: int
    worker: str

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


def parse_router_inputs(arrays: Arrays) -> RouterRequest:
    """Validate the inputs; raise `ValidationError` naming the first bad one."""
    given = [name for name in PROMPT_INPUTS if name in arrays]
    if not given:
        raise ValidationError("text_input", "a prompt is required: send text_input, messages or input_ids")
    if len(given) > 1:
        raise ValidationError(given[1], f"send only one of text_input, messages, input_ids (got {', '.join(given)})")
    sampling = parse_sampling(arrays)
    stop = tuple(s for s in get_str_list(arrays, "stop") if s)
    common = {
        "sampling": sampling,
        "stream": get_bool(arrays, "stream"),
        "stop": stop,
        "request_id": get_str(arrays, "request_id", "") or "",
    }
    get_bool(arrays, "exclude_input_in_output")  # accepted and type-checked only
    name = given[0]
    if name == "text_input":
        text = get_str(arrays, "text_input", "")
        if not text:
            raise ValidationError("text_input", "must not be empty")
        return RouterRequest(text_input=text, **common)  # type: ignore[arg-type]
    if name == "messages":
        return RouterRequest(messages=parse_messages(get_str(arrays, "messages", "") or ""), **common)  # type: ignore[arg-type]
    ids = get_int_list(arrays, "input_ids")
    if not ids:
        raise ValidationError("input_ids", "must not be empty")
    return RouterRequest(input_ids=ids, **common)  # type: ignore[arg-type]


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Reject request parameters the router does not know.

    Triton's HTTP generate extension turns JSON fields that are not model inputs into
    request parameters, so a misspelt input arrives here instead of being refused by the
    server; parameters Triton itself sets start with "triton_".
    """
    unknown = sorted(k for k in parameters if not k.startswith("triton_") and k not in ROUTER_INPUTS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown input; the router accepts {', '.join(ROUTER_INPUTS)}")


def parse_messages(raw: str) -> tuple[dict[str, Any], ...]:
    """The chat JSON: a non-empty array of {"role", "content"} objects."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValidationError("messages", f"invalid JSON: {exc}") from None
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        value = value["messages"]  # tolerate a whole chat-completions body
    if not isinstance(value, list) or not value:
        raise ValidationError("messages", "must be a JSON array of {role, content} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValidationError("messages", f"[{i}] must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ValidationError("messages", f"[{i}].role must be a non-empty string")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValidationError("messages", f"[{i}].content must be a string or a list of text parts")
    return tuple(value)


def encode_router_outputs(delta: RouterDelta) -> dict[str, np.ndarray]:
    return {
        "text_output": np.array([delta.text_output.encode("utf-8")], dtype=np.object_),
        "output_ids": np.asarray(delta.output_ids, dtype=np.int32),
        "finish_reason": np.array([delta.finish_reason.encode("utf-8")], dtype=np.object_),
        "num_input_tokens": np.array([delta.num_input_tokens], dtype=np.int32),
        "num_output_tokens": np.array([delta.num_output_tokens], dtype=np.int32),
        "cached_tokens": np.array([delta.cached_tokens], dtype=np.int32),
        "worker": np.array([delta.worker.encode("utf-8")], dtype=np.object_),
    }
