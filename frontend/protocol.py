"""OpenAI request schemas, their validation, and their translation to router requests.

`parse_body` turns raw HTTP bytes into a `ChatCompletionRequest` or `CompletionRequest`,
raising `frontend.errors.APIError` (400) whose `param` names the offending field as the
client spelled it (`messages[1].content`, `temperature`, ...). `to_router_requests` expands
one validated request into the `RouterRequest`s the router model runs: one per prompt and
per choice (`n`). Types are strict: `"max_tokens": "10"` is a 400, as it is at OpenAI.
Unknown fields are accepted and ignored (as vLLM does), so that clients sending newer
OpenAI fields keep working.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from pydantic import ValidationError as PydanticValidationError

from frontend.errors import APIError, invalid_request
from frontend.guided import constraint_of, param_map_of
from frontend.tools import ToolPlan, message_fields, plan_tools
from trident.core.router_io import MAX_JSON_DEPTH, RouterRequest, json_problem
from trident.core.types import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

Number = Annotated[float, Field(strict=True)]
INT32_MAX = 2**31 - 1  # the router's integer inputs are INT32 (trident.core.contract)
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt32 = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
PositiveInt32 = Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Strict):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _GenerationFields(_Strict):
    """Fields shared by both endpoints (OpenAI names, plus vLLM-style extensions)."""

    model: StrictStr
    max_tokens: PositiveInt32 | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, le=2**64 - 1)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: PositiveInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True, ge=-100.0, le=100.0)]] | None = None
    # Extensions (vLLM / Triton OpenAI frontend names).
    top_k: Annotated[int, Field(strict=True, ge=-1, le=INT32_MAX)] | None = None
    min_tokens: NonNegInt32 | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[TokenId] | None = None
    repetition_penalty: Annotated[float, Field(strict=True, gt=0.0)] | None = None
    min_p: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt32 | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_GenerationFields):
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: PositiveInt | None = None
    logprobs: TopLogprobs | None = None
    response_format: dict[str, Any] | None = None


# Router input -> the OpenAI field a client sent, for error messages from the router.
_ROUTER_PARAMS = {
    "random_seed": "seed",
    "stop_token_ids": "stop_token_ids",
    "logit_bias_ids": "logit_bias",
    "logit_bias_values": "logit_bias",
}


def parse_body(raw: bytes, kind: type[_GenerationFields]) -> Any:
    """Parse and validate a request body; raise a 400 `APIError` naming the bad field.

    Called by the route handlers of `frontend.app` with the raw bytes they read.
    """
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise invalid_request("Request body must be a JSON object", code="invalid_json")
    problem = json_problem(data)
    if problem is not None:
        param, reason = problem
        raise invalid_request(f"{param or 'body'}: {reason}", param=param or None)
    try:
        request = kind.model_validate(data)
    except PydanticValidationError as exc:
        raise _to_api_error(exc) from None
    if request.model_extra:
        logger.debug("ignoring unsupported fields %s", sorted(request.model_extra))
    return request


def _load_json(raw: bytes) -> Any:
    """`json.loads`, with every way it fails as a 400 (`ValueError` covers bad UTF-8 and
    integers of more than 4,300 digits; nesting of ~1,000 levels exhausts its stack)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid_request(
            f"Request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        raise invalid_request(
            f"Request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from None


def _to_api_error(exc: PydanticValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    # A union reports one error per member; the first says enough, the rest repeat it.
    first = errors[0]
    param = _param_of(first["loc"])
    got = first.get("input")
    detail = first["msg"]
    if first["type"] != "missing" and not isinstance(got, (dict, list)):
        detail += f" (got {json.dumps(got)[:80]})"
    if first["type"] == "missing":
        detail = "is a required field"
    return invalid_request(f"{param}: {detail}", param=param)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _UNION_TAGS or "[" in item or "-" in item:
            continue  # pydantic names union members in loc: they are not fields
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "body"


def validate_common(req: _GenerationFields, max_n: int) -> None:
    """Checks pydantic cannot express: unsupported options and cross-field rules."""
    if req.n > max_n:
        raise invalid_request(f"n: must be <= {max_n}, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise invalid_request(
            "stream_options: only allowed when stream is true", param="stream_options"
        )
    logit_bias_of(req)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(not s for s in stops):
        raise invalid_request("stop: stop strings must not be empty", param="stop")
    if len(stops) > 16:
        raise invalid_request(f"stop: at most 16 stop strings, got {len(stops)}", param="stop")


def logit_bias_of(req: _GenerationFields) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; its keys must be token ids (as strings).
    Ids outside the model's vocabulary are refused by the engine (a 400 naming logit_bias)."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or token > INT32_MAX or str(token) != key.strip():
            raise invalid_request(
                f"logit_bias: keys must be token ids, got {key[:40]!r}", param="logit_bias"
            )
        pairs.append((token, bias))
    return tuple(pairs)


def validate_chat(req: ChatCompletionRequest, max_n: int) -> list[dict[str, str]]:
    """Validate a chat request; return its messages as the router's chat JSON."""
    validate_common(req, max_n)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_request(
            "top_logprobs: requires logprobs to be true", param="top_logprobs"
        )
    guided_constraint(req)  # tools, tool_choice, response_format, guided_* (400s name the field)
    if not req.messages:
        raise invalid_request("messages: must contain at least one message", param="messages")
    return [
        {**_flatten_message(i, m), **message_fields(i, m.role, m.model_extra)}
        for i, m in enumerate(req.messages)
    ]


def tool_plan(req: _GenerationFields) -> ToolPlan | None:
    """The request's tools and tool_choice (`frontend.tools`); None without tools."""
    if not isinstance(req, ChatCompletionRequest):
        return None
    return plan_tools(
        req.tools, req.tool_choice, (req.model_extra or {}).get("parallel_tool_calls")
    )


def guided_constraint(req: _GenerationFields) -> tuple[str, str] | None:
    """(client field, structured_outputs JSON) constraining the output (`frontend.guided`)."""
    plan = tool_plan(req)
    return constraint_of(req, plan.constraint() if plan is not None else None)


def _flatten_message(index: int, message: ChatMessage) -> dict[str, str]:
    where = f"messages[{index}]"
    role = "system" if message.role == "developer" else message.role
    if role not in ("system", "user", "assistant", "tool"):
        raise invalid_request(
            f"{where}.role: must be 'system', 'developer', 'user', 'assistant' or 'tool', got {message.role!r}",
            param=f"{where}.role",
        )
    content = message.content
    if content is None:
        if role != "assistant":
            raise invalid_request(
                f"{where}.content: is required for role {role!r}", param=f"{where}.content"
            )
        return {"role": role, "content": ""}
    if isinstance(content, str):
        return {"role": role, "content": content}
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid_request(
                f"{where}.content[{j}]: only text parts are supported, got type {part.type!r}",
                param=f"{where}.content[{j}].type",
            )
        texts.append(part.text)
    return {"role": role, "content": "\n".join(texts)}


def validate_completion(req: CompletionRequest, max_n: int) -> list[str | tuple[int, ...]]:
    """Validate a completion request; return its prompts (text or token ids)."""
    validate_common(req, max_n)
    guided_constraint(req)  # response_format, guided_* (400s name the field)
    if req.suffix:
        raise invalid_request("suffix: not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid_request("best_of: only best_of == n is supported", param="best_of")
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[str | tuple[int, ...]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [tuple(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [p if isinstance(p, str) else tuple(p) for p in prompt]  # type: ignore[union-attr]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise invalid_request("prompt: must not be empty", param="prompt")
    if req.echo and any(not isinstance(p, str) for p in prompts):
        raise invalid_request("echo: only supported with text prompts", param="echo")
    return prompts


def max_tokens_of(req: _GenerationFields, default: int | None) -> tuple[int | None, str]:
    """The requested token budget and the field name the client used for it."""
    completion_tokens = getattr(req, "max_completion_tokens", None)
    if completion_tokens is not None:
        return completion_tokens, "max_completion_tokens"
    if req.max_tokens is not None:
        return req.max_tokens, "max_tokens"
    return default, "max_tokens"


def to_router_requests(
    req: _GenerationFields,
    prompts: list[str | tuple[int, ...]] | None,
    messages: list[dict[str, str]] | None,
    request_id: str,
    default_max_tokens: int | None,
) -> list[RouterRequest]:
    """One `RouterRequest` per (prompt, choice); choice `k` of prompt `p` is index p*n+k.

    Sampling fields the client left out take the router's defaults (SamplingParams'); the
    router validates the values. `stream` follows the client: a non-streaming request gets
    one router response instead of one per token, about a millisecond of CPU less per token.
    """
    max_tokens, _ = max_tokens_of(req, default_max_tokens)
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    inputs: list[dict[str, Any]]
    if messages is not None:
        inputs = [{"messages": tuple(messages)}]
    else:
        inputs = [
            {"text_input": p} if isinstance(p, str) else {"input_ids": p} for p in prompts or []
        ]
    out = []
    plan = tool_plan(req)
    for p, prompt_input in enumerate(inputs):
        for k in range(req.n):
            index = p * req.n + k
            seed = req.seed
            if seed is not None and req.n > 1:
                seed = (seed + k) % 2**64  # n samples of one prompt must differ
            out.append(
                RouterRequest(
                    sampling=_sampling(req, max_tokens, seed),
                    request_id=request_id if len(inputs) * req.n == 1 else f"{request_id}-{index}",
                    stop=stops,
                    stream=req.stream,
                    **prompt_input,
                    tools=plan.tools if plan is not None and messages is not None else None,
                )
            )
    return out


def _sampling(req: _GenerationFields, max_tokens: int | None, seed: int | None) -> SamplingParams:
    """The client's sampling fields over the router's defaults (None: not sent)."""
    sent: dict[str, Any] = {
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": None if req.top_k is None else max(req.top_k, 0),  # -1 (vLLM) = disabled
        "seed": seed,
        "stop_token_ids": tuple(req.stop_token_ids) if req.stop_token_ids else None,
        "ignore_eos": req.ignore_eos,
        "structured_outputs": (guided_constraint(req) or (None, None))[1],
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_p": req.min_p,
        "logit_bias": logit_bias_of(req) or None,
        **_logprobs(req),
    }
    return SamplingParams(**{k: v for k, v in sent.items() if v is not None})


def _logprobs(req: _GenerationFields) -> dict[str, int | None]:
    """SamplingParams.logprobs / prompt_logprobs: chat `logprobs` + `top_logprobs`;
    completions `logprobs: k`, and with `echo` the prompt's too."""
    if isinstance(req, ChatCompletionRequest):
        return {"logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    if isinstance(req, CompletionRequest) and req.logprobs is not None:
        return {"logprobs": req.logprobs, "prompt_logprobs": req.logprobs if req.echo else None}
    return {}


def router_param_map(req: _GenerationFields, chat: bool) -> dict[str, str]:
    """How the router's input names map to this request's OpenAI field names."""
    _, budget_field = max_tokens_of(req, None)
    prompt_field = "messages" if chat else "prompt"
    return {
        **_ROUTER_PARAMS,
        **param_map_of((guided_constraint(req) or (None, None))[0]),
        "logprobs": "top_logprobs" if chat else "logprobs",
        "prompt_logprobs": "logprobs",
        "max_tokens": budget_field,
        "text_input": prompt_field,
        "input_ids": prompt_field,
        "prompt": prompt_field,
        "messages": prompt_field,
    }
