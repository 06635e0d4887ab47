"""The frontend's only door to Triton: the `router` model over gRPC streaming.

`RouterClient` owns one `tritonclient.grpc.aio.InferenceServerClient` (one HTTP/2
channel) for the life of the app; it is created and closed by the app's lifespan on the
event loop's thread, and every method runs on that loop. `generate` opens one
bidirectional `ModelStreamInfer` stream per router request and yields `RouterDelta`s until
the response that carries a `finish_reason`. Leaving the generator early (the client went
away, a sibling choice failed, a timeout) cancels the gRPC call: Triton then marks the
request cancelled, the router cancels its BLS children and the workers free the blocks.
A stream whose request has had its last response is never cancelled but left to end by
itself (`_end_call`: cancelling it then makes Triton 2.51 leak a reference to the model).
Requests and responses go through `trident.core.router_io` (`encode_router_inputs`,
`decode_router_outputs`); each tensor's datatype comes from the `ROUTER_INPUTS` table.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from frontend.errors import APIError, from_triton_message, invalid_request, service_unavailable
from frontend.router_watch import RouterWatch
from trident.core import tracing
from trident.core.contract import ROUTER_INPUTS, ROUTER_OUTPUTS
from trident.core.errors import ValidationError
from trident.core.names import ADMIN_KEY_GRPC_HEADER, is_worker_model, replica_name
from trident.core.router_io import (
    RouterDelta,
    RouterRequest,
    decode_router_outputs,
    encode_router_inputs,
    probe_inputs,
)

logger = logging.getLogger(__name__)

# Router/worker config parameters that may name the served model, in order of preference.
_MODEL_ID_KEYS = ("served_model_name", "model_id", "model_name")
_MODEL_PATH_KEYS = ("model_path", "model", "gguf_path", "model_dir")
# Without the admin key, /health probes <pool>, <pool>_1 .. <pool>_{N-1} by name.
_PROBED_REPLICAS = 8


@dataclass(frozen=True, slots=True)
class Readiness:
    """What `/health` reports: the router's state and the worker models that are READY."""

    router_ready: bool
    workers: tuple[str, ...]
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.router_ready and bool(self.workers)


def _infer_inputs(arrays: dict[str, Any]) -> list[InferInput]:
    """The router's input tensors, each with its datatype from `ROUTER_INPUTS`."""
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), ROUTER_INPUTS[name].datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class RouterClient:
    """Streams generations from the `router` model and probes readiness.

    Created by `create_app`; `start()`/`close()` run in the app's lifespan. Not
    thread-safe: use it from the event loop that started it.
    """

    def __init__(
        self,
        url: str,
        router_model: str = "router",
        request_timeout_s: float = 600.0,
        health_timeout_s: float = 5.0,
        admin_key: str | None = None,
        probe_interval_s: float = 1.0,
    ) -> None:
        self.url = url
        self.admin_headers = {ADMIN_KEY_GRPC_HEADER: admin_key} if admin_key else None
        self.router_model = router_model
        self.request_timeout_s = request_timeout_s
        self.health_timeout_s = health_timeout_s
        self._client: grpcclient.InferenceServerClient | None = None
        self._ending: set[asyncio.Task[None]] = set()  # streams left to end (`_let_end`)
        self.watch = RouterWatch(self.probe, probe_interval_s, health_timeout_s)

    async def start(self) -> None:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        self.watch.start()

    async def close(self) -> None:
        await self.watch.close()
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=_END_GRACE_S)
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise service_unavailable("the Triton client is not started")
        return self._client

    async def generate(
        self, req: RouterRequest, param_map: dict[str, str] | None = None
    ) -> AsyncIterator[RouterDelta]:
        """Yield the router's responses for `req` up to and including the final one.

        Raises `APIError` for a Triton error (mapped by `from_triton_message`), a value the
        router's inputs cannot carry (400 naming the client's field) or a broken stream.
        Closing the generator early cancels the Triton request.
        """
        try:
            inputs = _infer_inputs(encode_router_inputs(req))
        except ValidationError as exc:
            field = (param_map or {}).get(exc.field, exc.field)
            raise invalid_request(f"{field}: {exc.message}", param=field) from None

        span = tracing.start("frontend.request", request_id=req.request_id)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            item = {"model_name": self.router_model, "inputs": inputs, "request_id": req.request_id}
            if span is not None:  # the trace continues in the router (trident.core.tracing)
                item["parameters"] = {tracing.TRACEPARENT: tracing.traceparent(span)}
            yield item

        stream = self.client.stream_infer(one_request(), stream_timeout=self.request_timeout_s)
        answered = False  # the request's last response (final or error) has arrived
        tracked = self.watch.track(stream)
        try:
            try:
                async for result, error in _guard(stream):
                    if error is not None:
                        answered = True
                        raise from_triton_message(error.message() or str(error), param_map)
                    delta = _parse(result)
                    answered = delta.final
                    yield delta
                    if answered:
                        return
                answered = True
                raise APIError(
                    502,
                    "the router closed the stream before the final response",
                    type="server_error",
                )
            except (asyncio.CancelledError, APIError):
                if tracked.lost is None or _cancelling():
                    raise
                raise service_unavailable(
                    f"{tracked.lost}; the request was lost with it: retry it"
                ) from None
        finally:
            tracing.end(span)
            self.watch.untrack(tracked)
            if answered:
                self._let_end(stream)
            else:
                logger.info("cancelling router stream request_id=%s", req.request_id)
                stream.cancel()

    async def probe(self) -> str:
        """The router instance's id from a liveness probe; `APIError` if the router fails it."""
        inputs = _infer_inputs(probe_inputs())

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.router_model, "inputs": inputs}

        stream = self.client.stream_infer(one_request(), stream_timeout=self.health_timeout_s)
        try:
            async for result, error in _guard(stream):
                if error is not None:
                    raise from_triton_message(error.message() or str(error))
                return _parse(result).text_output
            raise service_unavailable("the router closed a probe without an answer")
        finally:
            self._let_end(stream)

    def _let_end(self, stream: Any) -> None:
        """Leave a stream whose request has had its last response to end by itself.

        Synchronous (it runs in `generate`'s cleanup, maybe in a cancelled task): a task of
        its own waits for the end, and `close()` waits for those tasks.
        """
        task = asyncio.ensure_future(_end_call(stream))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def readiness(self) -> Readiness:
        """Router and worker model states, from `is_model_ready` probes.

        Probed names: what the repository index lists (only with the admin key, since
        `trident serve` restricts that API; replicas loaded with overrides may be missing
        from it) plus the names the router itself scans (`<pool>`, `<pool>_1`, ...).
        """
        router_ready, error = await self._is_ready(self.router_model)
        if not router_ready:
            return Readiness(False, (), error=error)
        names = sorted(set(await self._worker_candidates()) | set(await self._indexed_workers()))
        states = await asyncio.gather(*(self._is_ready(name) for name in names))
        return Readiness(True, tuple(n for n, (ok, _) in zip(names, states, strict=True) if ok))

    async def _indexed_workers(self) -> list[str]:
        if self.admin_headers is None:
            return []
        try:
            index = await self.client.get_model_repository_index(
                headers=self.admin_headers, as_json=True, client_timeout=self.health_timeout_s
            )
        except InferenceServerException as exc:
            logger.debug("repository index unavailable: %s", exc)
            return []
        return [m["name"] for m in index.get("models", []) if is_worker_model(m.get("name", ""))]

    async def _is_ready(self, model: str) -> tuple[bool, str | None]:
        try:
            return bool(
                await self.client.is_model_ready(model, client_timeout=self.health_timeout_s)
            ), None
        except (InferenceServerException, APIError) as exc:
            return False, str(exc)

    async def _worker_candidates(self) -> list[str]:
        """Pool names (`decode`, `prefill` or the router's `decode_pool`) and replicas 1..N."""
        pools = {"decode", "prefill"}
        fixed: set[str] = set()
        try:
            config = await self.client.get_model_config(
                self.router_model, as_json=True, client_timeout=self.health_timeout_s
            )
            params = config.get("config", config).get("parameters", {})
            for key in ("decode_pool", "prefill_pool"):
                value = (params.get(key) or {}).get("string_value", "").strip()
                if value and not value.startswith("${"):
                    pools.add(value)
            for key in ("decode_models", "prefill_models"):
                value = (params.get(key) or {}).get("string_value", "")
                fixed.update(
                    m.strip() for m in value.split(",") if m.strip() and not m.startswith("${")
                )
        except InferenceServerException as exc:
            logger.debug("router config unavailable for health probes: %s", exc)
        names = fixed | {replica_name(pool, i) for pool in pools for i in range(_PROBED_REPLICAS)}
        return sorted(names)

    async def served_model_id(self) -> str | None:
        """The engine's model id as the router or a worker config names it, if any."""
        for model in (self.router_model, "decode", "prefill"):
            try:
                config = await self.client.get_model_config(
                    model, as_json=True, client_timeout=self.health_timeout_s
                )
            except InferenceServerException:
                continue
            found = model_id_from_parameters(config.get("config", config).get("parameters", {}))
            if found:
                return found
        return None


def model_id_from_parameters(parameters: dict[str, Any]) -> str | None:
    """Pick a model id out of a Triton config's `parameters` map."""
    values = {k: (v or {}).get("string_value", "") for k, v in parameters.items()}
    for key in _MODEL_ID_KEYS:
        value = values.get(key, "").strip()
        if value and not value.startswith("${"):
            return value
    for key in _MODEL_PATH_KEYS:
        value = values.get(key, "").strip()
        if value and not value.startswith("${"):
            return model_id_from_path(value)
    return None


def model_id_from_path(path: str) -> str:
    """`.../SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
        name = re.sub(r"[.-](?:[QqFf]\d+(?:_[A-Za-z0-9]+)*|BF16|bf16)$", "", name)
    return name


# How long a call whose last response has arrived may take to end before it is cancelled.
_END_GRACE_S = 2.0


async def _end_call(stream: Any) -> None:
    """Wait for Triton to end a stream whose request has had its last response.

    Cancelling such a stream instead races Triton 2.51's own end of the call: when the
    cancellation arrives just after the last response, the server keeps a reference to
    the router model forever (shutdown then waits out --exit-timeout-secs, and the model
    cannot be unloaded). Our request iterator is exhausted, so the server ends the call
    within milliseconds; it is cancelled after `_END_GRACE_S`, or if this task is.
    """
    try:
        await asyncio.wait_for(_rest(stream), _END_GRACE_S)
    except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
        logger.debug("router stream did not end by itself (%s); cancelling", type(exc).__name__)
        stream.cancel()
    except (grpc.aio.AioRpcError, InferenceServerException) as exc:
        logger.debug("router stream ended with %s", exc)


async def _rest(stream: Any) -> None:
    iterator = stream.__aiter__()
    while True:
        try:
            await iterator.__anext__()
        except StopAsyncIteration:
            return


async def _guard(stream: Any) -> AsyncIterator[tuple[Any, Any]]:
    """Iterate a tritonclient response stream, turning gRPC failures into `APIError`s."""
    iterator = stream.__aiter__()
    while True:
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc) from None
        except InferenceServerException as exc:
            raise from_triton_message(exc.message() or str(exc)) from None
        yield item


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not just its gRPC call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _from_rpc_error(exc: grpc.aio.AioRpcError) -> APIError:
    code = exc.code()
    details = exc.details() or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return service_unavailable(f"Triton is unreachable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(
            504, f"the request timed out: {details}", type="timeout_error", code="timeout"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return APIError(429, details, type="rate_limit_error", code="resource_exhausted")
    return from_triton_message(details)


def _parse(result: Any) -> RouterDelta:
    """One router response. Each carries whole UTF-8 text (the router encodes `str` deltas),
    so no decoder state is kept across responses."""
    arrays = {name: a for name in ROUTER_OUTPUTS if (a := result.as_numpy(name)) is not None}
    try:
        return decode_router_outputs(arrays)
    except ValidationError as exc:
        raise APIError(
            502, f"the router sent a malformed response: {exc}", type="server_error"
        ) from None
