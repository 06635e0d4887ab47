"""The router model's edge (`RouterModel`) and the worker models' edge (`WorkerModel`) over
the fake `pb` (tests/fakes/pb_utils.py): real engines on the tiny model, real KV events over
ipc sockets, BLS calls delivered in-process. The real tritonserver runs the same code in
tests/integration."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.triton.events import WorkerEvents
from plugins.triton.metrics import WorkerMetrics
from plugins.triton.model import WorkerModel
from router_ensemble.triton.model import RouterModel
from tests.fakes import pb_utils as pb
from tests.waiting import wait_until
from trident.core.types import GenerateRequest, SamplingParams

PROMPT = list(range(3, 60))


def _worker(name: str, model_dir: str, **engine) -> WorkerModel:
    config = TorchEngineConfig(model=model_dir, dtype="float32", num_blocks=64, num_threads=1, worker_id=name, **engine)
    worker = WorkerModel(pb, name, TorchEngine(config), WorkerMetrics(pb, name), events=WorkerEvents(name))
    worker.start()
    return worker


@pytest.fixture
def stack(tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    pb.FakeServer.reset()
    monkeypatch.setenv("TRIDENT_KV_EVENTS_DIR", str(tmp_path))
    workers = {
        "decode": _worker("decode", tiny_model_dir),
        "prefill": _worker("prefill", tiny_model_dir, shareable_kv=True, lease_ttl_s=2.0),
    }
    for name, worker in workers.items():
        pb.FakeServer.serve_worker(name, worker)
    router = RouterModel(pb, "router", {"disagg_threshold": "32", "cancel_poll_ms": "10"})
    yield {"router": router, **workers}
    router.finalize()
    for worker in workers.values():
        worker.shutdown()


def _send(router: RouterModel, **inputs: object) -> pb.FakeRequest:
    arrays = {}
    for name, value in inputs.items():
        spec = {"input_ids": np.int32, "max_tokens": np.int32, "temperature": np.float32,
                "stream": np.bool_, "ignore_eos": np.bool_}[name]
        arrays[name] = np.asarray(value if isinstance(value, list) else [value], dtype=spec)
    request = pb.FakeRequest(arrays)
    router.execute([request])
    return request


def _outputs(request: pb.FakeRequest, timeout: float = 60.0) -> list[dict[str, np.ndarray]]:
    assert request.sender.closed.wait(timeout), "no final response"
    return [{t.name(): t.as_numpy() for t in r.output_tensors()} for r in request.sender.responses()]


def _ids(outputs: list[dict[str, np.ndarray]]) -> list[int]:
    return [int(t) for out in outputs for t in out["output_ids"]]


def _expected(worker: WorkerModel, prompt: list[int], n: int) -> list[int]:
    request = GenerateRequest("reference", tuple(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return [t for chunk in worker.engine.generate(request, timeout=60) for t in chunk.output_ids]


def test_streams_aggregated_and_disaggregated_requests_token_for_token(stack: dict) -> None:
    router, decode = stack["router"], stack["decode"]
    short = PROMPT[:20]  # below the threshold: the decode worker prefills
    outputs = _outputs(_send(router, input_ids=short, max_tokens=6, temperature=0.0, ignore_eos=True, stream=True))
    assert len(outputs) > 1 and outputs[-1]["finish_reason"][0] == b"length"
    assert all(o["finish_reason"][0] == b"" for o in outputs[:-1])
    assert outputs[-1]["worker"][0] == b"decode"
    assert _ids(outputs) == _expected(decode, short, 6)
    # long enough: the prefill worker computes the prompt, the decode worker pulls its KV
    outputs = _outputs(_send(router, input_ids=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(outputs) == 1 and outputs[0]["worker"][0] == b"prefill>decode"
    assert _ids(outputs) == _expected(decode, PROMPT, 6)
    wait_until(lambda: stack["prefill"].engine.stats().held_blocks == 0, timeout=10)


def test_bad_input_is_one_final_error_naming_the_field(stack: dict) -> None:
    request = _send(stack["router"], input_ids=PROMPT, max_tokens=0)
    assert request.sender.closed.wait(10)
    (response, flags), = request.sender.sent
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert response.has_error() and response.error().message().startswith("max_tokens:")
    unknown = pb.FakeRequest({"input_ids": np.asarray(PROMPT, dtype=np.int32)}, parameters={"max_token": 3})
    stack["router"].execute([unknown])
    assert unknown.sender.closed.wait(10)
    assert "max_token: unknown input" in unknown.sender.sent[0][0].error().message()


def test_a_cancelled_request_frees_the_workers_blocks(stack: dict) -> None:
    request = _send(stack["router"], input_ids=PROMPT[:20], max_tokens=200, ignore_eos=True, stream=True)
    wait_until(lambda: len(request.sender.sent) >= 2, timeout=30)
    request.cancelled = True
    assert request.sender.closed.wait(30)
    engine = stack["decode"].engine
    wait_until(lambda: engine.stats().active_blocks == 0 and engine.stats().running == 0, timeout=10)


def test_routing_metrics_are_labelled_by_pool(stack: dict) -> None:
    _outputs(_send(stack["router"], input_ids=PROMPT, max_tokens=2))
    _outputs(_send(stack["router"], input_ids=PROMPT[:10], max_tokens=2))  # its flush carries the first
    family = pb.MetricFamily.families["trident_router_decisions_total"]
    counts = {(m.labels["pool"], m.labels["worker"]): m.value for m in family.metrics}
    assert counts[("decode", "decode")] >= 1 and counts[("prefill", "prefill")] >= 1
    assert all(m.labels["router"] == "router" for m in family.metrics)


def test_worker_answers_abort_and_refuses_duplicates(stack: dict) -> None:
    decode = stack["decode"]
    ids = np.asarray(PROMPT[:10], dtype=np.int32)
    rid = np.array([b"same"], dtype=np.object_)
    long = {"input_ids": ids, "request_id": rid, "max_tokens": np.array([200], dtype=np.int32),
            "ignore_eos": np.array([True])}
    first = pb.FakeRequest(long)
    decode.execute([first])
    duplicate = pb.FakeRequest(long)
    decode.execute([duplicate])
    assert duplicate.sender.closed.wait(5)
    assert "request_id: 'same' is already running on decode" in duplicate.sender.sent[0][0].error().message()
    abort = pb.FakeRequest({"abort_request_id": rid})
    decode.execute([abort])
    assert abort.sender.closed.wait(5) and abort.sender.responses() == []
    assert first.sender.closed.wait(10)
    final = {t.name(): t.as_numpy() for t in first.sender.responses()[-1].output_tensors()}
    assert final["finish_reason"][0] == b"abort"
    deadline = time.monotonic() + 10
    while decode.engine.stats().active_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decode.engine.stats().active_blocks == 0
