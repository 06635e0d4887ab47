"""HTTP errors of the OpenAI frontend, shaped as OpenAI shapes them.

Every error the frontend returns has the body
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`. Route handlers raise
`APIError` (or let a `trident.core.errors` request error escape); the exception handlers that
`frontend.app.create_app` installs turn both into that body. `from_triton_message` maps the
text of a Triton error response from the `router` model onto the same classes, so a bad
field that only the router can judge (a prompt over the context length, say) still reaches
the client as a 400 that names the field.
"""

from __future__ import annotations

import re

from trident.core.errors import ContextLengthError, TridentError, ValidationError, WorkerUnavailable

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
UNAVAILABLE = "service_unavailable_error"
SERVER_ERROR = "server_error"


class APIError(TridentError):
    """An error that becomes one OpenAI-style HTTP error response.

    Raised by route handlers and by `frontend.triton_client.RouterClient`; caught by the
    exception handler installed in `create_app`, which renders `body()` with `status`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist",
        type=NOT_FOUND,
        param="model",
        code="model_not_found",
    )


def service_unavailable(message: str) -> APIError:
    return APIError(503, message, type=UNAVAILABLE, code="service_unavailable")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'",
        type=AUTHENTICATION,
        code="invalid_api_key",
    )


def from_trident_error(exc: TridentError) -> APIError:
    """The HTTP error for an error raised by Trident code (`trident.core.errors`)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return invalid_request(str(exc), param=exc.field, code="context_length_exceeded")
    if isinstance(exc, ValidationError):
        return invalid_request(str(exc), param=exc.field)
    if isinstance(exc, WorkerUnavailable):
        return service_unavailable(str(exc))
    return APIError(500, str(exc), type=SERVER_ERROR, code="internal_error")


# "<field>: <message>" as `trident.core.errors.ValidationError` formats it; Triton may prefix
# the text with its own context ("Python backend error: ..."), so search, don't anchor.
_FIELD_PREFIX = re.compile(r"(?:^|:\s|\]\s)([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_]+)*):\s+\S")
_UNAVAILABLE_HINTS = (
    "no worker",
    "no decode worker",
    "no ready worker",
    "workerunavailable",
    "worker unavailable",
    "is not ready",
    "not found",  # "Request for unknown model: 'router' is not found"
    "unknown model",
    "failed to connect",
    "connection refused",
    "unavailable",
)
_NOT_REQUEST_FIELDS = frozenset({"error", "exception", "traceback", "stub", "python", "triton"})


def from_triton_message(message: str, param_map: dict[str, str] | None = None) -> APIError:
    """Map the text of a Triton error from the `router` model to an HTTP error.

    `param_map` renames router input names to the OpenAI field the client sent
    (`text_input` -> `prompt`, `random_seed` -> `seed`, ...).
    """
    text = message.strip()
    lowered = text.lower()
    field = _field_of(text)
    if field is not None and param_map:
        field = param_map.get(field, field)
    if "context length" in lowered or "context window" in lowered:
        return invalid_request(text, param=field, code="context_length_exceeded")
    if field is not None:
        return invalid_request(text, param=field)
    if any(hint in lowered for hint in _UNAVAILABLE_HINTS):
        return service_unavailable(text)
    return APIError(500, text or "the router failed without a message", type=SERVER_ERROR)


def _field_of(text: str) -> str | None:
    for match in _FIELD_PREFIX.finditer(text):
        name = match.group(1)
        if name.split("[")[0].split(".")[0] not in _NOT_REQUEST_FIELDS:
            return name
    return None
