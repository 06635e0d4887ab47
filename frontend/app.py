"""The FastAPI app: OpenAI routes, health, metrics, API key and error handling.

`create_app(config)` is the one entry point (`frontend.main` and `trident serve` call it).
Everything runs on uvicorn's event loop; the app owns one `RouterClient` (started and
closed by the lifespan) and one `FrontendMetrics`. Request bodies are read raw and
validated by `frontend.protocol` so that every error, malformed JSON included, has
OpenAI's shape and names the field. The limits of `frontend.limits` apply before a
request reaches Triton: body size (413) and open router streams per API key (429).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend.args import FrontendConfig
from frontend.console import install_console
from frontend.errors import APIError, from_trident_error, model_not_found, unauthorized
from frontend.limits import StreamLease, StreamLimiter, read_body
from frontend.metrics import FrontendMetrics
from frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    router_param_map,
    to_router_requests,
    tool_plan,
    validate_chat,
    validate_completion,
)
from frontend.serving import Generation, ResponseShape, stream_events
from frontend.triton_client import RouterClient, model_id_from_path
from trident.core import tracing
from trident.core.errors import TridentError
from trident.core.model_files import resolve_model_path

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never seen by a client


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class ServedModels:
    """The model ids the app answers to: configured, or discovered from the router once."""

    def __init__(self, config: FrontendConfig, client: RouterClient) -> None:
        self.config = config
        self.client = client
        self.created = int(time.time())
        self._discovered: tuple[str, ...] = ()

    async def advertised(self) -> tuple[str, ...]:
        if self.config.model_names:
            return self.config.model_names
        if not self._discovered:
            found = await self.client.served_model_id() or _local_model_id()
            if found:
                self._discovered = (found,)
                logger.info("serving model id %s", found)
        return self._discovered or self.config.aliases[:1]

    async def resolve(self, name: str) -> str:
        """Return `name` if served, else raise 404."""
        if name in self.config.aliases or name in await self.advertised():
            return name
        raise model_not_found(name)


def _local_model_id() -> str | None:
    """The id of the model `trident serve` would load here (TRIDENT_MODEL or the default).

    Used only when neither the config nor the router's config parameters name the model.
    """
    try:
        return model_id_from_path(resolve_model_path(os.environ.get("TRIDENT_MODEL", "")))
    except TridentError:
        return None


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator, then runs `on_close`.

    Starlette leaves the iterator suspended when the client disconnects while a chunk is
    being sent; closing it here runs its cleanup, which cancels the Triton stream. If the
    client left before the first chunk, the iterator never started and closing it runs
    nothing: `on_close` (from `_respond`) then closes the router streams and releases the
    request's stream lease.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.on_close()


class RequestMetricsMiddleware:
    """Counts every HTTP response by route and status (pure ASGI: leaves streams alone)."""

    ENDPOINTS = {
        "/v1/chat/completions": "chat_completions",
        "/v1/completions": "completions",
        "/v1/models": "models",
        "/health": "health",
        "/metrics": "metrics",
    }

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = self.ENDPOINTS.get(path) or (
            "models" if path.startswith("/v1/models/") else "other"
        )
        status: list[int] = []

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.metrics.requests.inc(endpoint, str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except BaseException:
            if not status:  # ServerErrorMiddleware, outside us, answers 500
                self.metrics.requests.inc(endpoint, "500")
            raise
        if not status:
            self.metrics.requests.inc(endpoint, str(CLIENT_CLOSED))


def create_app(config: FrontendConfig | None = None, client: RouterClient | None = None) -> FastAPI:
    """Build the frontend app for `config` (validated here)."""
    config = (config or FrontendConfig()).validate()
    client = client or RouterClient(
        config.triton_url,
        config.router_model,
        config.request_timeout_s,
        config.health_timeout_s,
        admin_key=config.triton_admin_key,
        probe_interval_s=config.router_probe_s,
    )
    metrics = FrontendMetrics()
    tracing.configure("trident-frontend")  # on only with an OTLP endpoint in the environment
    models = ServedModels(config, client)
    limiter = StreamLimiter(config.max_streams_per_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        logger.info("frontend talking to %s model %r", config.triton_url, config.router_model)
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="Trident OpenAI frontend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.client = client
    app.state.metrics = metrics
    app.state.models = models
    app.state.limiter = limiter
    _install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        if not hmac.compare_digest(_bearer_token(request).encode(), config.api_key.encode()):
            raise unauthorized()

    authed = [Depends(require_api_key)]

    @app.get("/health")
    @app.get("/health/ready")
    async def health() -> JSONResponse:
        state = await client.readiness()
        body = {
            "status": "ready" if state.ready else "not_ready",
            "router": state.router_ready,
            "workers": list(state.workers),
        }
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "live"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    install_console(app, config, client, authed)

    @app.get("/v1/models", dependencies=authed)
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [_model_card(m, models.created) for m in await models.advertised()],
        }

    @app.get("/v1/models/{model:path}", dependencies=authed)
    async def get_model(model: str) -> dict[str, Any]:
        return _model_card(await models.resolve(model), models.created)

    def lease_for(request: Request, req: Any, streams: int) -> StreamLease:
        """Hold the request's router streams against its API key's limit."""
        # Without a configured key, presented tokens are not checked: they share one key.
        key = _bearer_token(request) if config.api_key is not None else ""
        param = "n" if req.n > 1 else ("messages" if hasattr(req, "messages") else "prompt")
        return limiter.acquire(key, streams, param)

    @app.post("/v1/chat/completions", dependencies=authed)
    async def chat_completions(request: Request) -> Response:
        req = parse_body(await read_body(request, config.max_body_bytes), ChatCompletionRequest)
        await models.resolve(req.model)
        messages = validate_chat(req, config.max_n)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        routed = to_router_requests(req, None, messages, response_id, config.default_max_tokens)
        shape = ResponseShape(True, response_id, req.model, int(time.time()))
        shape.tools = tool_plan(req)
        lease = lease_for(request, req, len(routed))
        generation = Generation(
            client, routed, router_param_map(req, chat=True), metrics, req.model, req.n
        )
        return await _respond(request, req, generation, shape, "chat_completions", metrics, lease)

    @app.post("/v1/completions", dependencies=authed)
    async def completions(request: Request) -> Response:
        req = parse_body(await read_body(request, config.max_body_bytes), CompletionRequest)
        await models.resolve(req.model)
        prompts = validate_completion(req, config.max_n)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        routed = to_router_requests(req, prompts, None, response_id, config.default_max_tokens)
        echo = [p for p in prompts if isinstance(p, str)] if req.echo else None
        shape = ResponseShape(False, response_id, req.model, int(time.time()), echo=echo)
        lease = lease_for(request, req, len(routed))
        generation = Generation(
            client, routed, router_param_map(req, chat=False), metrics, req.model, req.n
        )
        return await _respond(request, req, generation, shape, "completions", metrics, lease)

    return app


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _respond(
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    generation: Generation,
    shape: ResponseShape,
    endpoint: str,
    metrics: FrontendMetrics,
    lease: StreamLease,
) -> Response:
    """Run `generation` and answer with one JSON body or an SSE stream.

    Owns `lease`: released here, or, once streaming has started, when the SSE response
    closes (`_Ending`).
    """
    metrics.inflight.add(1, endpoint)
    deltas = generation.deltas()
    ending = _Ending(deltas, lease, endpoint, metrics)
    streaming_started = False
    try:
        if not req.stream:
            await _until_disconnect(request, _drain(deltas))
            generation.finish()
            return JSONResponse(shape.full(generation))
        # Wait for the first token before sending the status line, so that errors the
        # router finds (context length, a bad field, no worker) still get a 4xx/5xx.
        first = await _until_disconnect(request, deltas.__anext__())
        options = req.stream_options
        events = stream_events(
            generation,
            deltas,
            first,
            shape,
            include_usage=bool(
                options and (options.include_usage or options.continuous_usage_stats)
            ),
            continuous_usage=bool(options and options.continuous_usage_stats),
        )
        streaming_started = True
        return SSEResponse(
            _tracked(events, ending),
            ending.close,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    except ClientDisconnected:
        metrics.disconnects.inc(endpoint)
        logger.info("client disconnected before %s was ready; cancelled", shape.id)
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not streaming_started:
            await ending.close()


class _Ending:
    """The end of one generation request, done once whoever comes first: the request
    handler (an error, a JSON answer), the SSE body (`_tracked`) or the SSE response
    (`SSEResponse.on_close`, for a client gone before the first chunk)."""

    def __init__(
        self,
        deltas: AsyncGenerator[Any, None],
        lease: StreamLease,
        endpoint: str,
        metrics: FrontendMetrics,
    ) -> None:
        self.deltas = deltas
        self.lease = lease
        self.endpoint = endpoint
        self.metrics = metrics
        self.done = False

    def finish(self) -> None:
        """Count the request out and release its streams (synchronous: see `_tracked`)."""
        if not self.done:
            self.done = True
            self.metrics.inflight.add(-1, self.endpoint)
            self.lease.release()

    async def close(self) -> None:
        """Close the router streams (a no-op once closed), then `finish`."""
        try:
            await self.deltas.aclose()
        finally:
            self.finish()


async def _tracked(events: AsyncIterator[str], ending: _Ending) -> AsyncIterator[str]:
    """Pass `events` through; count a disconnect and end the request.

    Closing `events` does not suspend (serving.py keeps its cleanup synchronous), so it
    completes even inside the cancelled scope Starlette runs us in after a disconnect.
    """
    completed = False
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        completed = True
    finally:
        ending.finish()
        if not completed:
            ending.metrics.disconnects.inc(ending.endpoint)
            logger.info("client disconnected mid-stream; Triton stream cancelled")


async def _drain(deltas: AsyncIterator[Any]) -> None:
    async for _ in deltas:
        pass


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        watch.cancel()
    if job in done:
        return job.result()
    job.cancel()
    try:
        await job
    except BaseException:  # noqa: BLE001 - the job's outcome no longer matters
        pass
    raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read: the next message uvicorn delivers is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "trident"}


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        err = exc if isinstance(exc, APIError) else from_trident_error(exc)  # type: ignore[arg-type]
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(
            err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        err = APIError(400, str(exc))
        return JSONResponse(err.body(), status_code=400)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: %s", exc)
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_exception_handler(TridentError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
