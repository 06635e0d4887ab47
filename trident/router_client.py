"""A small blocking client for the `router` model (and the worker models) over gRPC streaming.

Decoupled models answer only on gRPC streams (or HTTP's generate extension), so every call
here goes through one bidirectional stream per client. Many requests may be in flight on
that stream at once, from any threads: responses are routed to each request by its id.
Used by the integration tests, the benchmarks and as a usage example; the OpenAI frontend
has its own asynchronous client.

    with RouterClient("127.0.0.1:8001") as client:
        text = client.generate_text(text_input="The capital of France is", max_tokens=8)
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from trident.core.contract import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    WORKER_INPUTS,
    WORKER_OUTPUTS,
    Contract,
    TensorSpec,
)
from trident.core.names import is_worker_model


def contracts(model: str, outputs: bool = False) -> tuple[Contract, Contract]:
    """`model`'s table first (worker models: WORKER_*, else ROUTER_*), then the other one."""
    router, worker = (ROUTER_OUTPUTS, WORKER_OUTPUTS) if outputs else (ROUTER_INPUTS, WORKER_INPUTS)
    return (worker, router) if is_worker_model(model) else (router, worker)


def spec_of(name: str, model: str = "router", outputs: bool = False) -> TensorSpec:
    """The spec of tensor `name` of `model`. The other table is searched too, so a worker
    pool of another name works; a name neither table knows raises `ValidationError`."""
    first, second = contracts(model, outputs)
    if name not in first and name in second:
        return second[name]
    return first.spec(name)


def to_array(name: str, value: Any, model: str = "router") -> tuple[np.ndarray, str]:
    """A Python value (or array) as the tensor `model` expects, with its Triton datatype."""
    spec = spec_of(name, model)
    return spec.encode(value), spec.datatype


def decode_outputs(result: Any, names: tuple[str, ...], model: str = "router") -> dict[str, Any]:
    """The outputs among `names` of one response as Python values: text as str, raw bytes
    as bytes, single values unwrapped, lists (dims [-1]) as lists."""
    out: dict[str, Any] = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            continue
        value = spec_of(name, model, outputs=True).read(array)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


class RouterClient:
    """One gRPC stream to the server, one request at a time (use one client per thread).

    Errors on a gRPC stream do not carry the request id, so concurrent requests each get
    their own client (a channel is cheap); `stream` holds a lock for the request's life.
    """

    def __init__(self, url: str, model: str = "router", output_names: tuple[str, ...] | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.model = model
        self.output_names = output_names  # None: every output of the model called
        self._client = grpcclient.InferenceServerClient(url)
        self._responses: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._streaming = False
        self._pending = False  # a request was sent and its final response not yet seen

    def _on_response(self, result: Any, error: Any) -> None:
        self._responses.put(error if error is not None else result)

    def stream(self, model: str | None = None, timeout: float = 300.0, **inputs: Any) -> Iterator[dict[str, Any]]:
        """Send one request; yield each response's outputs until the final one.

        Each input is encoded as `model`'s table declares it (see `to_array`). An error
        response raises `tritonclient.utils.InferenceServerException`.
        """
        model = model or self.model
        names = self.output_names or contracts(model, outputs=True)[0].names
        tensors = []
        for name, value in inputs.items():
            array, datatype = to_array(name, value, model)
            tensor = self._grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        with self._lock:
            if not self._streaming:
                self._responses = queue.Queue()
                self._client.start_stream(callback=self._on_response)
                self._streaming = True
            self._client.async_stream_infer(
                model, tensors, request_id=f"c{next(self._ids)}", enable_empty_final_response=True
            )
            self._pending = True
            while True:
                item = self._responses.get(timeout=timeout)
                if isinstance(item, Exception):
                    self._pending = False  # an error response is the request's last
                    raise item
                response = item.get_response()
                final = response.parameters["triton_final_response"].bool_param
                if final:
                    self._pending = False
                if response.outputs:
                    yield decode_outputs(item, names, model)
                if final:
                    return

    def generate(self, **inputs: Any) -> list[dict[str, Any]]:
        """All responses of one request."""
        return list(self.stream(**inputs))

    def generate_text(self, **inputs: Any) -> str:
        return "".join(r.get("text_output", "") for r in self.generate(**inputs))

    def cancel(self) -> None:
        """Cancel the in-flight request (from another thread, or after leaving `stream` early)."""
        if self._streaming:
            self._streaming = False
            # Cancel only a request still running: tritonserver 2.51 can keep a reference to the
            # model forever when a stream is cancelled right after its last response.
            self._client.stop_stream(cancel_requests=self._pending)
            self._pending = False

    def close(self) -> None:
        try:
            self.cancel()
        finally:
            self._client.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
