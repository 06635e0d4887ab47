"""The worker model's poller makes no `pb` call before Triton's first `execute` (a stub's own
thread calling into pb_utils while `initialize` runs has aborted the stub), and serves
cancellation and metrics once requests come. Real engine on the tiny model, fake `pb`."""

from __future__ import annotations

import threading
import time

import numpy as np

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.triton import model as worker_model
from plugins.triton.metrics import WorkerMetrics
from plugins.triton.model import WorkerModel
from tests.fakes import pb_utils as pb
from tests.waiting import wait_until


def _gauge(name: str) -> float:
    (metric,) = pb.MetricFamily.families[name].metrics
    return metric.value


def test_the_poller_waits_for_the_first_execute(tiny_model_dir: str) -> None:
    pb.FakeServer.reset()
    config = TorchEngineConfig(model=tiny_model_dir, dtype="float32", num_blocks=64, num_threads=1, worker_id="decode")
    worker = WorkerModel(pb, "decode", TorchEngine(config), WorkerMetrics(pb, "decode"), poll_s=0.01)
    worker.start()
    try:
        assert _gauge("trident_kv_blocks_capacity") == 64.0  # flushed once by start(), on initialize's thread
        pb.MetricFamily.families["trident_kv_blocks_capacity"].metrics[0].value = -1.0
        time.sleep(0.5)  # dozens of poll cycles, and one metrics flush would have been due
        assert _gauge("trident_kv_blocks_capacity") == -1.0, "the poller called pb before any execute"
        request = pb.FakeRequest({"input_ids": np.arange(3, 20, dtype=np.int32),
                                  "max_tokens": np.asarray([200], dtype=np.int32),
                                  "ignore_eos": np.asarray([True])})
        worker.execute([request])
        wait_until(lambda: _gauge("trident_kv_blocks_capacity") == 64.0)  # flushed now
        wait_until(lambda: request.sender.responses())
        request.cancelled = True  # the poller asks is_cancelled() now, and aborts
        assert request.sender.closed.wait(10), "the cancelled request was not ended"
        last = request.sender.responses()[-1]
        assert not last.has_error(), last.error().message()
        final = {t.name(): t.as_numpy() for t in last.output_tensors()}
        assert final["finish_reason"].item() == b"abort"
        wait_until(lambda: worker.engine.stats().running == 0)
    finally:
        worker.shutdown()


class _StuckSender(pb.FakeSender):
    """A response sender whose second send never returns (Triton 2.51's send to a BLS
    requester whose stub was killed), until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def send(self, response: pb.InferenceResponse | None = None, flags: int = 0) -> None:
        if self.responses():
            self.release.wait(30)
        super().send(response, flags)


def test_a_wedged_send_stops_load_reports_then_ends_the_stub(tiny_model_dir: str, monkeypatch) -> None:
    monkeypatch.setattr(worker_model, "SEND_STUCK_S", 0.2)
    monkeypatch.setattr(worker_model, "SEND_WEDGED_S", 1.0)
    pb.FakeServer.reset()
    config = TorchEngineConfig(model=tiny_model_dir, dtype="float32", num_blocks=64, num_threads=1, worker_id="decode")
    worker = WorkerModel(pb, "decode", TorchEngine(config), None, poll_s=0.01)
    exited = threading.Event()
    worker.on_wedged = exited.set  # instead of os._exit: the supervisor's part is tested in test_faults
    worker.start()
    sender = _StuckSender()
    try:
        assert worker.delivering()
        worker.execute([pb.FakeRequest({"input_ids": np.arange(3, 20, dtype=np.int32),
                                        "max_tokens": np.asarray([50], dtype=np.int32),
                                        "ignore_eos": np.asarray([True])}, sender=sender)])
        wait_until(lambda: not worker.delivering(), timeout=10)  # no more load reports
        assert not exited.is_set()
        assert exited.wait(10), "the watchdog did not end the wedged worker"
    finally:
        sender.release.set()
        worker.shutdown()
