"""Request limits of the OpenAI frontend: body size and concurrent router streams per key.

`read_body` is what the route handlers of `frontend.app` read a request body with: past
`FrontendConfig.max_body_bytes` it answers 413 without reading the rest. `StreamLimiter`
counts the router streams (one per prompt and choice, as `frontend.serving.Generation`
opens them) that each API key has open; a handler takes a `StreamLease` before the first
stream opens and releases it when the last one has closed: when the response is complete,
fails, or the client disconnects (the lease is released exactly once, whoever is first).
Everything here runs on the app's event loop, so the counts need no lock.
"""

from __future__ import annotations

import logging

from starlette.requests import Request

from frontend.errors import INVALID_REQUEST, APIError, invalid_request

logger = logging.getLogger(__name__)

RATE_LIMIT = "rate_limit_error"


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than max_body_bytes ({limit} bytes)",
        type=INVALID_REQUEST,
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; a 413 `APIError` once it passes `limit` bytes.

    A Content-Length over the limit is refused before any of the body is read.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class StreamLease:
    """Streams held by one request; `release()` gives them back (safe to call twice)."""

    __slots__ = ("limiter", "key", "streams", "released")

    def __init__(self, limiter: StreamLimiter, key: str, streams: int) -> None:
        self.limiter = limiter
        self.key = key
        self.streams = streams
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._give_back(self.key, self.streams)


class StreamLimiter:
    """Open router streams per API key, at most `max_per_key` (0: no limit).

    Created once by `create_app`; `acquire` is called by the route handlers. Without an
    API key configured every client shares one key (`""`): the limit is then global.
    """

    def __init__(self, max_per_key: int) -> None:
        self.max_per_key = max_per_key
        self._open: dict[str, int] = {}

    def open_streams(self, key: str) -> int:
        return self._open.get(key, 0)

    def acquire(self, key: str, streams: int, param: str) -> StreamLease:
        """Hold `streams` for `key`; raise 429 if that would pass the limit, 400 (naming
        `param`, the field that asked for that many) if no amount of waiting would help."""
        limit = self.max_per_key
        held = self.open_streams(key)
        if limit and streams > limit:
            raise invalid_request(
                f"{param}: this request needs {streams} streams (prompts x n), more than "
                f"max_streams_per_key ({limit})",
                param=param,
            )
        if limit and held + streams > limit:
            logger.info("refused %d streams: %d of %d open for this key", streams, held, limit)
            raise APIError(
                429,
                f"Too many concurrent streams for this API key: {held} open + {streams} "
                f"requested > max_streams_per_key ({limit}); retry when one has finished",
                type=RATE_LIMIT,
                code="rate_limit_exceeded",
            )
        self._open[key] = held + streams
        return StreamLease(self, key, streams)

    def _give_back(self, key: str, streams: int) -> None:
        left = self._open.get(key, 0) - streams
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
