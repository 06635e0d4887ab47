"""Bad inputs get errors naming the problem; cancellation frees the worker's KV blocks."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.helpers import CHAT_FRANCE, generate, metric_values
from tests.integration.server_fixture import ServerInfo
from tests.waiting import wait_for
from trident.router_client import RouterClient

BAD_INPUTS = [
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "Hi", "temperature": -0.5}, "temperature"),
    ({"text_input": "Hi", "top_p": 1.5}, "top_p"),
    ({"text_input": "Hi", "no_such_input": "x"}, "no_such_input"),
    ({"messages": '[{"role": "user", "content": "Hi"'}, "messages"),
    ({"messages": '[{"content": "Hi"}]'}, "messages"),
    ({"input_ids": [100] * 8300, "max_tokens": 4}, "prompt"),
    ({"input_ids": [100] * 100, "max_tokens": 8150}, "max_tokens"),
    ({"input_ids": [10**6]}, "input_ids"),
]


@pytest.mark.parametrize("inputs,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_over_http_names_the_field(triton_server: ServerInfo, inputs: dict, field: str) -> None:
    resp = generate(triton_server.http_url, **inputs)
    assert resp.status_code == 400, resp.text
    assert field in resp.json()["error"]


# Not "no_such_input" here: tritonserver 2.51 itself refuses an unknown input on a gRPC stream
# (naming it) but then never releases the model, which delays shutdown by --exit-timeout-secs.
GRPC_BAD_INPUTS = [case for case in BAD_INPUTS[:8] if case[1] != "no_such_input"]


@pytest.mark.parametrize("inputs,field", GRPC_BAD_INPUTS, ids=[f for _, f in GRPC_BAD_INPUTS])
def test_bad_input_over_grpc_names_the_field(triton_server: ServerInfo, inputs: dict, field: str) -> None:
    with RouterClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as err:
            client.generate(**inputs)
        assert field in str(err.value)
        # the same stream and the server keep serving
        assert "Paris" in client.generate_text(messages=CHAT_FRANCE, max_tokens=24, temperature=0.0)


def _used_blocks(server: ServerInfo, worker: str) -> float:
    return metric_values(server.metrics_url, "trident_kv_blocks_used").get(worker, -1.0)


@pytest.mark.parametrize("model", ["router", "decode"])
def test_cancellation_mid_stream_frees_the_workers_blocks(triton_server: ServerInfo, model: str) -> None:
    client = RouterClient(triton_server.grpc_url)
    if model == "router":
        stream = client.stream(text_input="Tell me a very long story.", max_tokens=2000, ignore_eos=True, stream=True)
    else:
        stream = client.stream(model="decode", input_ids=list(range(100, 180)), max_tokens=2000, ignore_eos=True)
    first = [next(stream) for _ in range(3)]
    worker = first[0].get("worker", "decode")
    assert all(not r["finish_reason"] for r in first)
    assert wait_for(lambda: _used_blocks(triton_server, worker) > 0), "blocks in use while generating"
    client.cancel()
    stream.close()
    assert wait_for(lambda: _used_blocks(triton_server, worker) == 0, timeout=20), "blocks freed after cancel"
    running = metric_values(triton_server.metrics_url, "trident_requests_running")
    assert running.get(worker) == 0
    client.close()
    with RouterClient(triton_server.grpc_url) as again:
        assert again.generate_text(text_input="Hello", max_tokens=3)
