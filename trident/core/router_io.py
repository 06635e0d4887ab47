"""Tensor I/O of the `router` model, both ends, without Triton.

The router model parses a request with `check_parameters` and `parse_router_inputs` and
answers with `encode_router_outputs`; a caller (the OpenAI frontend) sends a request with
`encode_router_inputs` and reads the answers with `decode_router_outputs`. The tensors are
the tables `ROUTER_INPUTS` and `ROUTER_OUTPUTS` in `trident.core.contract` (names, types,
dims, defaults and what each one means); this module maps them to and from `RouterRequest`
and `RouterDelta`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trident.core.contract import PROMPT_INPUTS, ROUTER_INPUTS, ROUTER_OUTPUTS, Arrays
from trident.core.errors import ValidationError
from trident.core.types import SamplingParams
from trident.core.worker_io import sampling_params, sampling_values


@dataclass(frozen=True, slots=True)
class RouterRequest:
    """A client request as the orchestrator sees it (exactly one prompt form set)."""

    sampling: SamplingParams
    text_input: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    input_ids: tuple[int, ...] | None = None
    stream: bool = False
    stop: tuple[str, ...] = ()
    request_id: str = ""
    tools: tuple[dict[str, Any], ...] | None = None  # with messages: for the chat template


@dataclass(frozen=True, slots=True)
class RouterDelta:
    """One router response: new text and ids since the previous one (or all of it).

    The fields are the router's outputs, one for one (`ROUTER_OUTPUTS`). The logprob
    fields are flat: k alternatives per position (`worker_io.unflatten_top` splits them).
    """

    text_output: str
    output_ids: tuple[int, ...]
    finish_reason: str  # "" until the last response
    num_input_tokens: int
    num_output_tokens: int  # cumulative
    cached_tokens: int
    worker: str
    output_logprobs: tuple[float, ...] = ()
    top_logprob_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    prompt_token_logprobs: tuple[float, ...] = ()
    prompt_top_logprob_ids: tuple[int, ...] = ()
    prompt_top_logprobs: tuple[float, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    output_tokens: tuple[str, ...] = ()  # token texts, for OpenAI's logprobs
    top_logprob_tokens: tuple[str, ...] = ()
    prompt_tokens: tuple[str, ...] = ()
    prompt_top_logprob_tokens: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


# ---- the router's side ------------------------------------------------------------------
def parse_router_inputs(arrays: Arrays) -> RouterRequest:
    """Validate the inputs; raise `ValidationError` naming the first bad one."""
    given = [name for name in PROMPT_INPUTS if name in arrays]
    if not given:
        raise ValidationError("text_input", "a prompt is required: send text_input, messages or input_ids")
    if len(given) > 1:
        raise ValidationError(given[1], f"send only one of text_input, messages, input_ids (got {', '.join(given)})")
    values = ROUTER_INPUTS.read(arrays, defaults=True)  # exclude_input_in_output: type-checked only
    sampling = sampling_params(values)
    text, messages, ids = values["text_input"], None, values["input_ids"]
    if given[0] == "text_input" and not text:
        raise ValidationError("text_input", "must not be empty")
    if given[0] == "messages":
        messages = parse_messages(values["messages"])
    if given[0] == "input_ids" and not ids:
        raise ValidationError("input_ids", "must not be empty")
    return RouterRequest(
        sampling=sampling,
        text_input=text,
        messages=messages,
        input_ids=ids,
        stream=values["stream"],
        stop=tuple(s for s in values["stop"] if s),
        request_id=values["request_id"],
        tools=None if values.get("tools") is None else parse_tools(values["tools"], messages is not None),
    )


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Reject request parameters: the router reads inputs only.

    Triton's HTTP generate extension turns JSON fields that are not model inputs into
    request parameters, so a misspelt input arrives here instead of being refused by the
    server. A gRPC client can also send a parameter that has an input's name
    (`max_tokens`), which the router would otherwise ignore without a word. Parameters
    Triton itself sets start with "triton_".
    """
    for name in sorted(k for k in parameters if not k.startswith("triton_")):
        ROUTER_INPUTS.spec(name)  # raises ValidationError naming an unknown input
        raise ValidationError(name, "was sent as a request parameter; send it as an input tensor")


# Deeper JSON than any chat needs is refused before it reaches the chat template.
MAX_JSON_DEPTH = 64


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, str] | None:
    """The first place in parsed JSON that cannot travel on as text, as (path, reason).

    Python's `json` accepts two things UTF-8 text cannot carry on: lone surrogates from
    escapes like "\\ud800" (in keys too), which the tokenizer and every UTF-8 encoder
    refuse, and nesting deep enough to exhaust the stack of whatever walks it next. Paths
    read like `[0].content` (empty for the top level). Iterative, so any depth is safe.
    Called by `parse_messages` here and by the OpenAI frontend's body parser.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not _is_utf8(item):
                return path, "is not valid Unicode text (lone surrogate)"
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= max_depth:
            return path, f"is nested deeper than {max_depth} levels"
        if isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(enumerate(item))))
            continue
        for key, v in reversed(list(item.items())):
            if not _is_utf8(key):
                return path, "has a key that is not valid Unicode text (lone surrogate)"
            stack.append((v, f"{path}.{key}" if path else key, depth + 1))
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_messages(raw: str) -> tuple[dict[str, Any], ...]:
    """The chat JSON: a non-empty array of {"role", "content"} objects."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValidationError("messages", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError("messages", f"is nested deeper than {MAX_JSON_DEPTH} levels") from None
    problem = json_problem(value)
    if problem is not None:
        where, reason = problem
        raise ValidationError("messages", f"{where or 'the JSON'} {reason}")
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


def parse_tools(raw: str, chat: bool) -> tuple[dict[str, Any], ...]:
    """The `tools` input: a JSON array of OpenAI tool objects, sent with `messages` only."""
    if not chat:
        raise ValidationError("tools", "goes with messages (the chat template renders it)")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValidationError("tools", f"invalid JSON: {exc}") from None
    problem = json_problem(value)
    if problem is not None:
        raise ValidationError("tools", f"{problem[0] or 'the JSON'} {problem[1]}")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValidationError("tools", "must be a JSON array of tool objects")
    return tuple(value)


def is_probe(array: Any) -> bool:
    """Whether a `probe` input asks for a liveness answer (any true element)."""
    try:
        return bool(np.asarray(array).astype(bool).any())
    except (TypeError, ValueError):
        return False


def probe_answer(instance_id: str) -> RouterDelta:
    """The one final response to a `probe`: the router instance's id as `text_output`."""
    return RouterDelta(instance_id, (), "stop", 0, 0, 0, "")


def encode_router_outputs(delta: RouterDelta) -> dict[str, np.ndarray]:
    """The response tensors of `delta` (its logprob and echo outputs only when it has them)."""
    return ROUTER_OUTPUTS.encode_response({name: getattr(delta, name) for name in ROUTER_OUTPUTS})


# ---- the caller's side ------------------------------------------------------------------
def encode_router_inputs(request: RouterRequest) -> dict[str, np.ndarray]:
    """The router's input tensors for `request`.

    Values equal to the router's own defaults are left out: the router reads the same
    request back (`parse_router_inputs`), with fewer tensors on the wire.
    """
    messages = request.messages
    values = {
        "text_input": request.text_input,
        "messages": None if messages is None else json.dumps(list(messages), ensure_ascii=False),
        "input_ids": request.input_ids,
        **sampling_values(request.sampling),
        "stream": request.stream,
        "stop": request.stop,
        "request_id": request.request_id,
        "tools": None if request.tools is None else json.dumps(list(request.tools), ensure_ascii=False),
    }
    return ROUTER_INPUTS.encode({k: v for k, v in values.items() if v != ROUTER_INPUTS.spec(k).default})


def probe_inputs() -> dict[str, np.ndarray]:
    """The input tensors of a liveness probe (answered by `probe_answer`)."""
    return ROUTER_INPUTS.encode({"probe": True})


def decode_router_outputs(arrays: Arrays) -> RouterDelta:
    """One router response; absent outputs take their defaults. `ValidationError` names a bad one."""
    return RouterDelta(**ROUTER_OUTPUTS.read(arrays, defaults=True))
