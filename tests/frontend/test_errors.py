"""Mapping Triton/router error text to OpenAI-shaped HTTP errors."""

from __future__ import annotations

import pytest

from frontend.errors import APIError, from_trident_error, from_triton_message
from trident.core.errors import ContextLengthError, EngineError, ValidationError, WorkerUnavailable


def test_body_has_openai_shape() -> None:
    body = APIError(400, "temperature: too hot", param="temperature").body()
    assert body == {
        "error": {
            "message": "temperature: too hot",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }


@pytest.mark.parametrize(
    ("message", "status", "param", "code"),
    [
        ("max_tokens: must be a positive integer, got 0", 400, "max_tokens", None),
        ("Python backend error: temperature: must be >= 0, got -1.0", 400, "temperature", None),
        ("text_input: must not be empty", 400, "prompt", None),
        ("random_seed: must be a non-negative integer", 400, "seed", None),
        (
            "prompt: prompt (9000 tokens) + max_tokens (16) = 9016 exceeds the model's context length (8192)",
            400,
            "prompt",
            "context_length_exceeded",
        ),
        ("no worker is ready to serve the request", 503, None, "service_unavailable"),
        ("Request for unknown model: 'router' is not found", 503, None, "service_unavailable"),
        ("something broke inside", 500, None, None),
    ],
)
def test_triton_messages_map_to_http_errors(
    message: str, status: int, param: str | None, code: str | None
) -> None:
    err = from_triton_message(message, {"text_input": "prompt", "random_seed": "seed"})
    assert (err.status, err.param, err.code) == (status, param, code)
    assert err.message == message


def test_trident_errors_map_to_http_errors() -> None:
    assert from_trident_error(ValidationError("top_p", "bad")).status == 400
    ctx = from_trident_error(ContextLengthError("max_tokens", "too long"))
    assert (ctx.status, ctx.param, ctx.code) == (400, "max_tokens", "context_length_exceeded")
    assert from_trident_error(WorkerUnavailable("none")).status == 503
    assert from_trident_error(EngineError("boom")).status == 500
