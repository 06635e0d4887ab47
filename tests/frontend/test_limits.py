"""The frontend's limits, each refused with an OpenAI error that names it.

Body size (`max_body_bytes`, 413), choices (`max_n`, 400 naming `n`), prompt tokens (the
router's context check, 400 naming `prompt`/`messages`, code `context_length_exceeded`)
and open router streams per API key (`max_streams_per_key`, 429). A key's streams come
back when a request ends, fails, or its client disconnects. The real stack throughout:
`limited_frontend` (conftest.LIMITED) in front of the session's tritonserver.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from frontend.args import FrontendConfig, parse_args
from frontend.errors import APIError
from frontend.limits import StreamLimiter
from frontend.main import BackgroundFrontend
from tests.frontend.conftest import API_KEY, LIMITED, MODEL_ID
from tests.waiting import wait_for
from trident.core.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "Hi"}]
LONG = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 2000,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture(scope="module")
def http(limited_frontend: BackgroundFrontend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_frontend.base_url, headers=AUTH, timeout=60) as client:
        yield client


def limiter(frontend: BackgroundFrontend) -> StreamLimiter:
    return frontend.server.config.app.state.limiter


def chat(http: httpx.Client, **fields: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HI, **fields})


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- configuration --------------------------------------------------------------------
def test_limits_are_settings_with_flags_and_env_vars() -> None:
    assert (FrontendConfig().max_body_bytes, FrontendConfig().max_streams_per_key) == (4 << 20, 0)
    env = {"TRIDENT_FRONTEND_MAX_STREAMS_PER_KEY": "8", "TRIDENT_FRONTEND_MAX_BODY_BYTES": "99"}
    cfg = parse_args(["--max-body-bytes", "1024"], env=env)
    assert (cfg.max_body_bytes, cfg.max_streams_per_key) == (1024, 8)
    for argv, name in (
        (["--max-body-bytes", "0"], "max_body_bytes"),
        (["--max-streams-per-key", "-1"], "max_streams_per_key"),
        (["--max-streams-per-key", "many"], "max_streams_per_key"),
    ):
        with pytest.raises(ConfigError, match=f"^{name}: "):
            parse_args(argv, env={})


# ---- body size ------------------------------------------------------------------------
def _padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (the padding is an ignored field)."""
    head = b'{"model": "' + MODEL_ID.encode() + b'", "max_tokens": 1, "messages": '
    head += b'[{"role": "user", "content": "Hi"}], "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_a_body_over_max_body_bytes_is_a_413(http: httpx.Client) -> None:
    limit = LIMITED["max_body_bytes"]
    assert http.post("/v1/chat/completions", content=_padded(limit)).status_code == 200
    for content in (_padded(limit + 1), iter([_padded(limit + 1)])):  # Content-Length, chunked
        error = error_of(http.post("/v1/chat/completions", content=content), 413)
        assert (
            error["code"] == "request_too_large" and f"max_body_bytes ({limit}" in error["message"]
        )


# ---- choices and prompt tokens -----------------------------------------------------------
def test_n_over_max_n_names_n(http: httpx.Client) -> None:
    error = error_of(chat(http, n=17, max_tokens=1), 400)
    assert error["param"] == "n" and "n: must be <= 16" in error["message"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "hello " * 9000}, "prompt"),
        ("/v1/completions", {"prompt": [100] * 8200}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi " * 9000}]},
            "messages",
        ),
    ],
    ids=["text", "token-ids", "chat"],
)
def test_a_prompt_over_the_context_names_the_prompt(
    base_url: str, path: str, body: dict[str, Any], param: str
) -> None:
    """The frontend has no tokenizer: the router counts, and its error comes back as a 400
    (from the default frontend: these bodies are over LIMITED's max_body_bytes)."""
    resp = httpx.post(
        f"{base_url}{path}", json={"model": MODEL_ID, "max_tokens": 2, **body}, timeout=60
    )
    error = error_of(resp, 400)
    assert error["param"] == param and error["code"] == "context_length_exceeded"
    assert "exceeds the model's context length (8192)" in error["message"]


# ---- streams per key ------------------------------------------------------------------------
def _streams_back(frontend: BackgroundFrontend) -> bool:
    return wait_for(lambda: limiter(frontend).open_streams(API_KEY) == 0, timeout=15.0)


def test_streams_past_the_limit_are_a_429_until_one_ends(
    http: httpx.Client, limited_frontend: BackgroundFrontend
) -> None:
    assert _streams_back(limited_frontend)
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "n": 2}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # held: a dropped iterator closes the response
        next(lines)  # both choices are generating
        assert limiter(limited_frontend).open_streams(API_KEY) == 2
        error = error_of(chat(http, max_tokens=1), 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "max_streams_per_key (2)" in error["message"]
    # Leaving the block closed the connection mid-stream: the streams come back.
    assert _streams_back(limited_frontend)
    assert chat(http, max_tokens=1).status_code == 200


def test_a_request_that_can_never_fit_names_its_field(http: httpx.Client) -> None:
    error = error_of(chat(http, n=3, max_tokens=1), 400)
    assert error["param"] == "n" and "max_streams_per_key (2)" in error["message"]
    body = {"model": MODEL_ID, "prompt": ["a", "b", "c"], "max_tokens": 1}
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == "prompt"


@pytest.mark.parametrize("stream", [False, True])
def test_streams_come_back_after_answers_and_errors(
    http: httpx.Client, limited_frontend: BackgroundFrontend, stream: bool
) -> None:
    assert chat(http, max_tokens=2, n=2, stream=stream).status_code == 200
    assert _streams_back(limited_frontend)
    assert error_of(chat(http, max_tokens=9000, n=2, stream=stream), 400)["param"] == "max_tokens"
    assert _streams_back(limited_frontend)


def test_streams_come_back_when_a_non_streaming_client_leaves(
    limited_frontend: BackgroundFrontend,
) -> None:
    """The client gives up waiting for the whole answer: its streams are released."""
    assert _streams_back(limited_frontend)
    outcome: list[BaseException] = []

    def impatient_client() -> None:
        try:
            httpx.post(
                f"{limited_frontend.base_url}/v1/chat/completions",
                json={**LONG, "stream": False, "n": 2},
                headers=AUTH,
                timeout=httpx.Timeout(60, read=4.0),
            )
        except httpx.ReadTimeout as exc:
            outcome.append(exc)

    client = threading.Thread(target=impatient_client)
    client.start()
    assert wait_for(lambda: limiter(limited_frontend).open_streams(API_KEY) == 2, timeout=4.0)
    client.join(timeout=30)
    assert outcome, "the client should have timed out waiting"
    assert _streams_back(limited_frontend)


def test_a_lease_gives_its_streams_back_once() -> None:
    """The handler, the SSE body and the SSE response may each release: only one counts."""
    limits = StreamLimiter(3)
    first, second = limits.acquire("k", 2, "n"), limits.acquire("other", 3, "n")
    with pytest.raises(APIError) as full:
        limits.acquire("k", 2, "n")
    assert full.value.status == 429 and limits.open_streams("k") == 2
    first.release()
    first.release()
    assert (limits.open_streams("k"), limits.open_streams("other")) == (0, 3)
    second.release()
    assert limits._open == {}
    assert StreamLimiter(0).acquire("k", 10**6, "n").streams == 10**6  # 0: no limit
