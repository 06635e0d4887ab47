"""`GrpcWorkerClient` against the real tritonserver: the router's way to workers on other
nodes keeps the in-process (BLS) contract: the same greedy tokens, early close aborts the
request on the worker and frees its blocks, worker errors keep the worker's message, an
unreachable node or unknown worker is `WorkerUnavailable`."""

from __future__ import annotations

import pytest

from router_ensemble.triton.grpc_client import GrpcWorkerClient
from tests.integration.helpers import metric_values
from tests.waiting import wait_for
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.types import GenerateRequest, SamplingParams
from trident.router_client import RouterClient

PROMPT = tuple(range(200, 260))


@pytest.fixture
def client(triton_server):
    c = GrpcWorkerClient({"node-a/decode": (triton_server.grpc_url, "decode")}, timeout_s=60)
    yield c
    c.close()


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_tokens_equal_a_direct_call_and_streams_are_reused(client, triton_server) -> None:
    with RouterClient(triton_server.grpc_url, model="decode") as direct:
        want = [t for r in direct.generate(input_ids=list(PROMPT), max_tokens=8, temperature=0.0, ignore_eos=True)
                for t in r.get("output_ids", [])]
    for i in range(3):  # the second and third take the stream the first gave back
        chunks = list(client.generate("node-a/decode", GenerateRequest(f"g{i}", PROMPT, _greedy(8))))
        assert [t for c in chunks for t in c.output_ids] == want
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        assert chunks[-1].num_input_tokens == len(PROMPT)
    assert len(client._idle[triton_server.grpc_url]) == 1


def test_closing_early_aborts_the_request_on_the_worker(client, triton_server) -> None:
    stream = client.generate("node-a/decode", GenerateRequest("long", PROMPT, _greedy(400)))
    next(stream)
    next(stream)
    stream.close()  # returns once the worker has ended it
    running = metric_values(triton_server.metrics_url, "trident_requests_running")
    assert wait_for(lambda: metric_values(triton_server.metrics_url, "trident_requests_running").get("decode") == 0,
                    timeout=10), running
    # the stream is clean for the next request
    chunks = list(client.generate("node-a/decode", GenerateRequest("after", PROMPT, _greedy(2))))
    assert chunks[-1].finished and sum(len(c.output_ids) for c in chunks) == 2


def test_worker_errors_keep_the_workers_message(client) -> None:
    bad = GenerateRequest("bad", PROMPT, SamplingParams(max_tokens=4, top_p=0.0))
    with pytest.raises(EngineError, match="top_p"):
        list(client.generate("node-a/decode", bad))
    assert list(client.generate("node-a/decode", GenerateRequest("ok", PROMPT, _greedy(1))))[-1].finished


def test_unreachable_nodes_and_unknown_workers_are_unavailable(client) -> None:
    gone = GrpcWorkerClient({"node-z/decode": ("127.0.0.1:1", "decode")}, timeout_s=5, probe_timeout_s=1)
    try:
        assert not gone.is_model_ready("node-z/decode")
        with pytest.raises(WorkerUnavailable, match="node-z/decode"):
            list(gone.generate("node-z/decode", GenerateRequest("x", PROMPT, _greedy(1))))
    finally:
        gone.close()
    assert client.is_model_ready("node-a/decode")
    with pytest.raises(WorkerUnavailable, match="no node is known"):
        list(client.generate("node-q/decode", GenerateRequest("y", PROMPT, _greedy(1))))
