"""`WorkerClient` over Triton gRPC streaming: the router reaching worker models on other
tritonservers (one per node), with the contract `BlsWorkerClient` keeps in-process.

Each `generate` takes one stream of its node's pool (a `tritonclient.grpc` client with its
stream started; a stream carries one request at a time, because Triton's stream errors do
not name the request they belong to) and gives it back when the request has ended. The
worker's responses arrive in order; an error response raises `EngineError` with the
worker's message, a node that cannot be reached `WorkerUnreachable` (the request never got
there: the orchestration may send it to another worker), a node lost mid-request
`WorkerUnavailable`. Closing the stream
before the finished chunk sends the worker an abort (`abort_request_id`, on a stream of its
own) and reads the request's stream to its final response, so the worker has freed the
request's blocks when `generate` returns; a stream that saw a transport error is closed,
never reused.

Who calls it: the orchestration's request threads (`generate`, `abort`); `is_model_ready` is
a readiness probe for tools and tests (the router counts a registered worker as ready).
`close()` at the router model's `finalize`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from router_ensemble.orchestration.ports import ChunkStream
from trident.core.contract import WORKER_INPUTS, WORKER_OUTPUTS
from trident.core.errors import EngineError, WorkerUnavailable, WorkerUnreachable
from trident.core.types import GenerateRequest
from trident.core.worker_io import decode_chunk_outputs, encode_abort_inputs, encode_generate_inputs

logger = logging.getLogger(__name__)

_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


class _Stream:
    """One client with its stream started; responses (or errors) land in `responses`."""

    def __init__(self, url: str, grpc: Any) -> None:
        self.client = grpc.InferenceServerClient(url)
        self.responses: queue.Queue[Any] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put(error or result))
        self.broken = False

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
        except Exception as exc:  # a stream of a node that died: nothing left to close
            logger.debug("closing a gRPC worker stream: %s", exc)


class GrpcWorkerClient:
    """Streams from worker models on remote tritonservers. Thread-safe.

    `nodes` maps a worker id to the gRPC address of the tritonserver holding it and the
    model name there (`{"node-b/decode": ("10.0.0.2:8001", "decode")}`); `resolve` may be
    given instead, to follow a discovery backend. `timeout_s` bounds the wait for each
    response (a node that stops answering ends the request with `WorkerUnavailable`)."""

    def __init__(
        self,
        nodes: Mapping[str, tuple[str, str]] | None = None,
        *,
        resolve: Callable[[str], tuple[str, str] | None] | None = None,
        timeout_s: float = 300.0,
        probe_timeout_s: float = 2.0,
        max_idle_per_node: int = 16,
    ) -> None:
        import tritonclient.grpc as grpc

        self._grpc = grpc
        self._nodes = dict(nodes or {})
        self._resolve = resolve
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self._max_idle = max_idle_per_node
        self._idle: dict[str, list[_Stream]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def where(self, worker: str) -> tuple[str, str]:
        """(gRPC address, model name) of `worker`; `WorkerUnavailable` when unknown."""
        found = self._nodes.get(worker) or (self._resolve(worker) if self._resolve else None)
        if found is None:
            raise WorkerUnavailable(f"worker {worker}: no node is known for it")
        return found

    def is_model_ready(self, worker: str) -> bool:
        try:
            url, model = self.where(worker)
            client = self._grpc.InferenceServerClient(url)
            try:
                return bool(client.is_model_ready(model, client_timeout=self.probe_timeout_s))
            finally:
                client.close()
        except Exception as exc:  # unreachable or unknown: not ready
            logger.debug("probe %s: %s", worker, exc)
            return False

    def generate(self, worker: str, request: GenerateRequest) -> ChunkStream:
        url, model = self.where(worker)
        stream = self._open(worker, url, model, encode_generate_inputs(request), request.request_id,
                            WORKER_OUTPUTS.names)
        done = False  # the request's final response was read: the stream is free again
        finished = False  # the finished chunk (or an error) was seen
        try:
            while not done:
                result = self._next(stream, worker)
                response = result.get_response()
                done = response.parameters["triton_final_response"].bool_param
                arrays = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if arrays:
                    chunk = decode_chunk_outputs(arrays, request.request_id)
                    finished = finished or chunk.finished
                    yield chunk
        except EngineError:
            done = finished = True  # an error response is the worker's last
            raise
        finally:
            if not done and not stream.broken:
                if not finished:  # closed early: the worker must stop and free the blocks
                    self.abort(worker, request.request_id)
                self._drain(stream, worker)
            self._give_back(url, stream)

    def abort(self, worker: str, request_id: str) -> None:
        """Ask `worker` to abort `request_id` (no-op if it already finished)."""
        try:
            url, model = self.where(worker)
            stream = self._open(worker, url, model, encode_abort_inputs(request_id), f"abort-{request_id}", ())
            try:
                while True:
                    response = self._next(stream, worker)
                    if response.get_response().parameters["triton_final_response"].bool_param:
                        break
            finally:
                self._give_back(url, stream)
        except Exception as exc:  # the node may be gone; its worker's own cleanup frees blocks
            logger.warning("worker=%s abort of %s failed: %s", worker, request_id, exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream in streams:
                stream.close()

    # ------------------------------------------------------------ internals

    def _open(self, worker: str, url: str, model: str, arrays: dict[str, np.ndarray], request_id: str,
              outputs: tuple[str, ...]) -> _Stream:
        """A stream with the request sent on it. An idle stream may have died with its
        connection (the node restarted): then once more on a fresh one."""
        stream = self._take(url)
        for fresh in (stream is None, True):
            try:
                stream = stream or _Stream(url, self._grpc)
                self._send(stream, model, arrays, request_id, outputs)
                return stream
            except Exception as exc:
                if stream is not None:
                    stream.close()
                stream = None
                if fresh:
                    raise WorkerUnreachable(f"worker {worker}: cannot reach {url}: {exc}") from exc
        raise AssertionError("unreachable")

    def _take(self, url: str) -> _Stream | None:
        with self._lock:
            if self._closed:
                raise WorkerUnavailable("the router's gRPC worker client is closed")
            idle = self._idle.get(url)
            return idle.pop() if idle else None

    def _give_back(self, url: str, stream: _Stream) -> None:
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if not stream.broken and not self._closed and len(idle) < self._max_idle:
                idle.append(stream)
                return
        stream.close()

    def _send(self, stream: _Stream, model: str, arrays: dict[str, np.ndarray], request_id: str,
              outputs: tuple[str, ...]) -> None:
        grpc = self._grpc
        inputs = []
        for name, array in arrays.items():
            tensor = grpc.InferInput(name, list(array.shape), WORKER_INPUTS[name].datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [grpc.InferRequestedOutput(name) for name in outputs]
        stream.client.async_stream_infer(
            model, inputs, request_id=request_id, outputs=requested or None, enable_empty_final_response=True
        )

    def _next(self, stream: _Stream, worker: str) -> Any:
        try:
            item = stream.responses.get(timeout=self.timeout_s)
        except queue.Empty:
            stream.broken = True
            raise WorkerUnavailable(f"worker {worker}: no response in {self.timeout_s:.0f} s") from None
        if isinstance(item, Exception):
            message = str(item)
            if "failed to connect" in message.lower():  # no connection: the request never got there
                stream.broken = True
                raise WorkerUnreachable(f"worker {worker}: {message}")
            if any(mark in message for mark in _UNREACHABLE):
                stream.broken = True
                raise WorkerUnavailable(f"worker {worker}: {message}")
            raise EngineError(_worker_message(item))
        return item

    def _drain(self, stream: _Stream, worker: str) -> None:
        """Read the aborted request's stream to its final response."""
        try:
            while True:
                response = self._next(stream, worker)
                if response.get_response().parameters["triton_final_response"].bool_param:
                    return
        except EngineError:
            return  # the worker ended it with an error: that was its last response
        except WorkerUnavailable:
            stream.broken = True


def _worker_message(exc: Exception) -> str:
    """The worker's own message of a Triton error (without tritonclient's status prefix)."""
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return text.removeprefix("[StatusCode.INTERNAL] ").removeprefix("[StatusCode.INVALID_ARGUMENT] ")
