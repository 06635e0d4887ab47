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

# input name -> (Triton datatype, numpy dtype)
INPUT_TYPES: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(("text_input", "messages", "request_id", "stop", "abort_request_id"), ("BYTES", np.object_)),
    **dict.fromkeys(("input_ids", "max_tokens", "min_tokens", "top_k", "stop_token_ids"), ("INT32", np.int32)),
    **dict.fromkeys(("temperature", "top_p"), ("FP32", np.float32)),
    **dict.fromkeys(("seed", "random_seed"), ("UINT64", np.uint64)),
    **dict.fromkeys(("stream", "ignore_eos", "exclude_input_in_output"), ("BOOL", np.bool_)),
}
_NP_TO_TRITON = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
                 np.dtype(np.uint64): "UINT64", np.dtype(np.bool_): "BOOL", np.dtype(np.object_): "BYTES"}


def to_array(name: str, value: Any) -> tuple[np.ndarray, str]:
    """A Python value as the tensor the model expects (scalars become shape [1])."""
    if isinstance(value, np.ndarray):
        return value, _NP_TO_TRITON[value.dtype]
    datatype, dtype = INPUT_TYPES.get(name, ("BYTES", np.object_))
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if dtype is np.object_:
        return np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=np.object_), datatype
    return np.array(values, dtype=dtype), datatype


def decode_outputs(result: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Outputs of one response as Python values (strings decoded, scalars unwrapped)."""
    out: dict[str, Any] = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            continue
        if array.dtype == np.object_:
            items = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.reshape(-1)]
            out[name] = items[0] if len(items) == 1 else items
        elif name in ("output_ids",):
            out[name] = [int(v) for v in array.reshape(-1)]
        else:
            out[name] = array.reshape(-1)[0].item() if array.size == 1 else array.tolist()
    return out


ROUTER_OUTPUT_NAMES = ("text_output", "output_ids", "finish_reason", "num_input_tokens",
                       "num_output_tokens", "cached_tokens", "worker")


class RouterClient:
    """One gRPC stream to the server, one request at a time (use one client per thread).

    Errors on a gRPC stream do not carry the request id, so concurrent requests each get
    their own client (a channel is cheap); `stream` holds a lock for the request's life.
    """

    def __init__(self, url: str, model: str = "router", output_names: tuple[str, ...] = ROUTER_OUTPUT_NAMES) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.model = model
        self.output_names = output_names
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

        An error response raises `tritonclient.utils.InferenceServerException`.
        """
        tensors = []
        for name, value in inputs.items():
            array, datatype = to_array(name, value)
            tensor = self._grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        with self._lock:
            if not self._streaming:
                self._responses = queue.Queue()
                self._client.start_stream(callback=self._on_response)
                self._streaming = True
            self._client.async_stream_infer(
                model or self.model, tensors, request_id=f"c{next(self._ids)}", enable_empty_final_response=True
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
                    yield decode_outputs(item, self.output_names)
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
