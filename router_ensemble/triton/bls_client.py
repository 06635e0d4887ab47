"""`WorkerClient` over Triton BLS: the router model calling worker models in-process.

Used inside the router model's stub, with the stub's `triton_python_backend_utils` passed in
as `pb` (unit tests pass a fake). Each
`generate` is one decoupled BLS request (`exec(decoupled=True)`) whose responses arrive in
order on the calling request thread. Closing the stream early sends the worker an abort
(a second BLS request with `abort_request_id`) and drains the rest of the stream, so the
worker frees the request's blocks and no response is left behind.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from router_ensemble.orchestration.ports import ChunkStream
from trident.core import tracing
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.types import GenerateRequest
from trident.core.worker_io import (
    WORKER_OUTPUTS,
    decode_chunk_outputs,
    encode_abort_inputs,
    encode_generate_inputs,
)

logger = logging.getLogger(__name__)

# Triton's answer to a request for a model whose stub process died (until it is reloaded).
_STUB_DEAD = "is not healthy"


# A finished BLS response iterator keeps every response it received, and the numpy arrays of
# their tensors. Whoever drops the last reference destroys them: if that is the stub's C++
# cleanup thread (it holds a reference until the server confirms the request is done), the
# arrays are freed without the GIL and the stub's heap is corrupted (segfaults under load,
# seen on Triton 2.51: PbTensor::~PbTensor -> numpy array_dealloc from
# Stub::ServiceStubToParentRequests). So finished iterators are kept here for a while and
# released on a request thread, after the stub has let go of them.
_RETIRE_AFTER_S = 10.0
_retired: collections.deque[tuple[float, Any]] = collections.deque()
_retired_lock = threading.Lock()


def _retire(responses: Any) -> None:
    now = time.monotonic()
    with _retired_lock:
        _retired.append((now, responses))
        expired = []
        while _retired and now - _retired[0][0] > _RETIRE_AFTER_S:
            expired.append(_retired.popleft()[1])
    del expired  # the last references go here, on this Python thread, holding the GIL


def release_retired() -> None:
    """Drop every retired iterator now; the router model calls it in `finalize` (at interpreter
    exit the stub's shared memory is gone and freeing them then crashes)."""
    with _retired_lock:
        expired = list(_retired)
        _retired.clear()
    del expired


class BlsWorkerClient:
    """Streams from worker models through BLS. Stateless; any request thread may call it."""

    def __init__(self, pb: Any) -> None:
        self.pb = pb

    def is_model_ready(self, name: str) -> bool:
        """Probe for `WorkerDirectory`: whether the server has `name` loaded and ready."""
        return bool(self.pb.is_model_ready(model_name=name))

    def generate(self, worker: str, request: GenerateRequest) -> ChunkStream:
        # a child of the router's request span; the worker continues it (trident.core.tracing)
        span = tracing.start("router.call", request_id=request.request_id, worker=worker)
        try:
            responses = self._exec(
                worker, encode_generate_inputs(request), WORKER_OUTPUTS.names, tracing.traceparent(span)
            )
        except BaseException as exc:
            tracing.end(span, str(exc))
            raise
        finished = False
        try:
            for response in responses:
                if response.has_error():
                    finished = True  # an error response is the worker's last
                    message = response.error().message()
                    if _STUB_DEAD in message:  # the worker's stub was killed: another may serve
                        raise WorkerUnavailable(f"worker {worker}: {message}")
                    raise EngineError(message)
                arrays = {t.name(): t.as_numpy() for t in response.output_tensors()}
                if not arrays:  # the flag-only COMPLETE_FINAL of a decoupled stream
                    continue
                chunk = decode_chunk_outputs(arrays, request.request_id)
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                self.abort(worker, request.request_id)
            # Consume the stream to its end (after an abort: the worker's final "abort"
            # response) so that the stub releases the BLS response iterator.
            for _ in responses:
                pass
            _retire(responses)
            tracing.end(span)

    def abort(self, worker: str, request_id: str) -> None:
        """Ask `worker` to abort `request_id` (no-op if it already finished)."""
        try:
            responses = self._exec(worker, encode_abort_inputs(request_id), ())
            for response in responses:
                if response.has_error():
                    logger.warning("worker=%s abort of %s: %s", worker, request_id, response.error().message())
            _retire(responses)
        except Exception as exc:  # the worker may be unloading; its own cleanup frees blocks
            logger.warning("worker=%s abort of %s failed: %s", worker, request_id, exc)

    def _exec(self, worker: str, arrays: dict[str, Any], outputs: tuple[str, ...], traceparent: str = "") -> Any:
        pb = self.pb
        extra = {"parameters": {tracing.TRACEPARENT: traceparent}} if traceparent else {}
        bls = pb.InferenceRequest(
            model_name=worker,
            inputs=[pb.Tensor(name, value) for name, value in arrays.items()],
            requested_output_names=list(outputs),
            **extra,
        )
        try:
            return bls.exec(decoupled=True)
        except pb.TritonModelException as exc:
            raise WorkerUnavailable(f"worker {worker}: {exc}") from exc

