"""A small fake of `triton_python_backend_utils`, for unit tests of our Triton edges.

It has what `router_ensemble.triton` and `plugins.triton` call, with the same names and
shapes: tensors, responses, errors, decoupled response senders, BLS requests, metric
families and the logger. A `FakeServer` holds the "loaded models": BLS calls to a model go
to its handler, a callable `(FakeRequest) -> None` that answers through the request's
sender (a `WorkerModel.execute` wrapped by `FakeServer.serve_worker`). The integration tests
run the real tritonserver; this fake only lets the edges be tested without it.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonModelException(Exception):
    pass


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._tensors = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class FakeSender:
    """A decoupled response sender: records (response, flags); closed by COMPLETE_FINAL."""

    def __init__(self, on_send: Callable[[InferenceResponse | None, int], None] | None = None) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.closed = threading.Event()
        self.on_send = on_send
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._lock:
            if self.closed.is_set():
                raise TritonModelException("the request is already complete")
            self.sent.append((response, flags))
            if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self.closed.set()
        if self.on_send is not None:
            self.on_send(response, flags)

    def responses(self) -> list[InferenceResponse]:
        return [r for r, _ in self.sent if r is not None]


class FakeRequest:
    """What `execute` receives: inputs by name, request parameters, cancellation."""

    _ids = itertools.count()

    def __init__(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None = None,
                 sender: FakeSender | None = None) -> None:
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}
        self._parameters = json.dumps(parameters or {})
        self.sender = sender or FakeSender()
        self.cancelled = False
        self._id = f"fake-{next(self._ids)}"

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled

    def parameters(self) -> str:
        return self._parameters

    def request_id(self) -> str:
        return self._id


def get_input_tensor_by_name(request: FakeRequest, name: str) -> Tensor | None:
    return request.inputs.get(name)


class _Metric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.value = 0.0
        self.observations: list[float] = []

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.observations.append(value)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"
    families: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[_Metric] = []
        MetricFamily.families[name] = self

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> _Metric:  # noqa: N802
        metric = _Metric(dict(labels))
        self.metrics.append(metric)
        return metric


class Logger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, text: str) -> None:
        cls.lines.append(("info", text))

    @classmethod
    def log_warn(cls, text: str) -> None:
        cls.lines.append(("warn", text))

    @classmethod
    def log_error(cls, text: str) -> None:
        cls.lines.append(("error", text))

    @classmethod
    def log_verbose(cls, text: str) -> None:
        cls.lines.append(("verbose", text))


class FakeServer:
    """The models BLS can reach. `handlers[name](request)` answers through `request.sender`."""

    handlers: dict[str, Callable[[FakeRequest], None]] = {}
    requests: list[tuple[str, FakeRequest]] = []

    @classmethod
    def reset(cls) -> None:
        cls.handlers = {}
        cls.requests = []
        MetricFamily.families = {}

    @classmethod
    def serve_worker(cls, name: str, worker: Any) -> None:
        """Route BLS calls for `name` to a `plugins.triton.model.WorkerModel`."""
        cls.handlers[name] = lambda request: worker.execute([request])


def is_model_ready(model_name: str) -> bool:
    return model_name in FakeServer.handlers


class InferenceRequest:
    """A BLS request; `exec(decoupled=True)` streams the handler's responses, then ends
    after the COMPLETE_FINAL flag, as the stub's response iterator does."""

    def __init__(self, model_name: str, inputs: list[Tensor], requested_output_names: list[str]) -> None:
        self.model_name = model_name
        self.inputs = {t.name(): t.as_numpy() for t in inputs}
        self.requested_output_names = requested_output_names

    def exec(self, decoupled: bool = False) -> Iterator[InferenceResponse]:
        handler = FakeServer.handlers.get(self.model_name)
        if handler is None:
            raise TritonModelException(f"Failed for execute the inference request. Model '{self.model_name}' is not ready.")
        responses: queue.SimpleQueue[tuple[InferenceResponse | None, int]] = queue.SimpleQueue()
        request = FakeRequest(self.inputs, sender=FakeSender(lambda r, f: responses.put((r, f))))
        FakeServer.requests.append((self.model_name, request))
        handler(request)
        return _iterate(responses)


def _iterate(responses: queue.SimpleQueue) -> Iterator[InferenceResponse]:
    while True:
        response, flags = responses.get(timeout=60)
        yield response if response is not None else InferenceResponse()
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            return
