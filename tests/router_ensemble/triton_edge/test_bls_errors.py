"""How the BLS client reports a worker's error response: Triton's answer for a model whose
stub process died ("Stub process '<instance>' is not healthy.", as tritonserver 2.51 sends
it, seen in tests/integration/test_faults.py) means the worker is lost (`WorkerUnavailable`:
the router migrates the request); any other error is the worker's own (`EngineError`)."""

from __future__ import annotations

import pytest

from router_ensemble.triton.bls_client import BlsWorkerClient
from tests.fakes import pb_utils as pb
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.types import GenerateRequest, SamplingParams


def _answer_with_error(message: str) -> None:
    def handler(request: pb.FakeRequest) -> None:
        request.sender.send(pb.InferenceResponse(error=pb.TritonError(message)),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    pb.FakeServer.reset()
    pb.FakeServer.handlers["decode"] = handler


@pytest.mark.parametrize("message, error", [
    ("Stub process 'decode_0_0' is not healthy.", WorkerUnavailable),
    ("max_tokens: must be a positive integer, got 0", EngineError),
])
def test_error_responses(message: str, error: type[Exception]) -> None:
    _answer_with_error(message)
    request = GenerateRequest("r1", (1, 2, 3), SamplingParams(max_tokens=2))
    with pytest.raises(error) as raised:
        list(BlsWorkerClient(pb).generate("decode", request))
    assert message in str(raised.value)
    assert type(raised.value) is error
