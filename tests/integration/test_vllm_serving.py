"""vLLM workers in the real tritonserver: `trident serve --engine vllm --prefill 1 --decode 2`.

The router hears vLLM's own KV events (its ZMQ publisher, hashed its own way; the router
recomputes its hashes from the events' token ids) and the workers' load reports. Prompts of
DISAGG_THRESHOLD uncached tokens or more are prefilled by the vLLM prefill worker and handed
to a vLLM decode worker through our KV connector; shorter ones stay on the decode workers.
One server for this module; vLLM in eager mode so that it starts in seconds.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("vllm")

from tests.frontend.conftest import MODEL_ID, start_frontend  # noqa: E402
from tests.integration.helpers import call_worker, metric_values  # noqa: E402
from tests.integration.server_fixture import ServerInfo, serve_config_for_tests  # noqa: E402
from tests.waiting import wait_for  # noqa: E402
from trident.launcher import Launcher  # noqa: E402
from trident.router_client import RouterClient  # noqa: E402

BLOCK = 32  # vLLM's CPU block size, the router's too when the engine is vllm
DISAGG_THRESHOLD = 400  # above every prompt of the aggregated tests below


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    import dataclasses

    tmp_dir = str(tmp_path_factory.mktemp("tritonserver-vllm"))
    # fp32 KV: 2048 tokens (max_model_len) need ~90 MiB
    config = dataclasses.replace(serve_config_for_tests(tmp_dir), engine="vllm", kv_cache_mb=128, prefill=1,
                                 disagg_threshold=DISAGG_THRESHOLD)
    launcher = Launcher(config)
    saved = os.environ.get("TRIDENT_ENFORCE_EAGER")
    os.environ["TRIDENT_ENFORCE_EAGER"] = "1"  # the server's environment is built in start()
    try:
        ep = launcher.start()
    except Exception as exc:
        pytest.fail(f"tritonserver with vLLM workers did not start: {exc}")
    finally:
        if saved is None:
            os.environ.pop("TRIDENT_ENFORCE_EAGER", None)
        else:
            os.environ["TRIDENT_ENFORCE_EAGER"] = saved
    try:
        yield ServerInfo(ep.http_url, ep.grpc_url, ep.metrics_url, tuple(launcher.decode_models),
                         str(launcher.log_path), launcher)
    finally:
        launcher.stop()


def _chat(system: str, question: str) -> str:
    return json.dumps([{"role": "system", "content": system}, {"role": "user", "content": question}])


def test_chat_over_openai_is_answered_by_a_vllm_worker(vllm_server: ServerInfo) -> None:
    import openai

    frontend = start_frontend(vllm_server)
    try:
        client = openai.OpenAI(base_url=frontend.base_url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 7  # the end-of-turn token is not counted
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0, stream=True,
        )
        deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(deltas) > 2 and "".join(deltas) == reply.choices[0].message.content
    finally:
        frontend.stop()
    log = open(vllm_server.log_path, encoding="utf-8", errors="replace").read()
    assert "Initializing a V1 LLM engine" in log  # it is vLLM that answered


def test_cancellation_frees_vllms_blocks(vllm_server: ServerInfo) -> None:
    client = RouterClient(vllm_server.grpc_url)
    stream = client.stream(text_input="Tell me a very long story.", max_tokens=1500, ignore_eos=True, stream=True)
    first = [next(stream) for _ in range(3)]
    worker = first[0]["worker"]
    assert worker in vllm_server.decode_models

    def used() -> float:
        return metric_values(vllm_server.metrics_url, "trident_kv_blocks_used").get(worker, -1.0)

    assert wait_for(lambda: used() > 0, timeout=20), "vLLM's blocks in use while generating"
    client.cancel()
    stream.close()
    client.close()
    assert wait_for(lambda: used() == 0, timeout=20), "blocks freed after cancel"
    assert metric_values(vllm_server.metrics_url, "trident_requests_running").get(worker) == 0
    with RouterClient(vllm_server.grpc_url) as again:
        assert again.generate_text(text_input="Hello", max_tokens=3)


def test_shared_prefix_goes_back_to_the_vllm_worker_that_cached_it(vllm_server: ServerInfo) -> None:
    system = f"Session {uuid.uuid4().hex}. " + " ".join(f"rule {i}: be kind and brief." for i in range(25))
    with RouterClient(vllm_server.grpc_url) as client:
        (first,) = client.generate(messages=_chat(system, "What is two plus two?"), max_tokens=4, temperature=0.0)
        assert first["cached_tokens"] == 0
        worker = first["worker"]
        other = next(w for w in vllm_server.decode_models if w != worker)
        # the other worker gets its own prefix, so both have something cached
        other_system = f"Other {uuid.uuid4().hex}. " + " ".join(f"fact {i}: water is wet." for i in range(25))
        hits = []

        def routed_to_cache() -> bool:
            (out,) = client.generate(messages=_chat(system, f"Question {len(hits)}?"), max_tokens=2, temperature=0.0)
            hits.append(out)
            return out["worker"] == worker and out["cached_tokens"] > 0

        assert wait_for(routed_to_cache, timeout=15, interval=0.3), hits
        out = hits[-1]
        assert out["cached_tokens"] % BLOCK == 0 and out["cached_tokens"] >= 160, out
        # a different prefix is not sent to the busy cache: it has nothing there
        (fresh,) = client.generate(messages=_chat(other_system, "Hi?"), max_tokens=2, temperature=0.0)
        assert fresh["cached_tokens"] == 0
        assert {worker, other} == set(vllm_server.decode_models)
    # the router predicted the hit from vLLM's events (not just the engine reporting it)
    text = httpx.get(vllm_server.metrics_url, timeout=10).text
    predicted = re.findall(r'^trident_router_cache_hit_ratio\{[^}]*kind="predicted"[^}]*\} (\S+)$', text, re.M)
    assert predicted and max(float(v) for v in predicted) > 0, predicted


def test_vllm_prefill_then_vllm_decode_equals_vllm_aggregated(vllm_server: ServerInfo) -> None:
    """Greedy, token for token: prompts prefilled by the vLLM prefill worker (over its 512-token
    step budget, so staged over two steps; sharing another's prefix, so staged partly from the
    prefill worker's prefix cache; neither) and decoded by a vLLM decode worker, against the
    same prompts computed by the other decode worker alone, which has never seen them."""
    import numpy as np

    from router_ensemble.text.tokenizer import load_tokenizer

    tok = load_tokenizer("")
    def days(first: int, last: int) -> str:
        return " ".join(f"On day {i} the keeper of the lighthouse counted {i * 7 % 13} ships and {i * 5 % 11} gulls."
                        for i in range(first, last))

    log = f"Log {uuid.uuid4().hex}. " + days(0, 28)
    # A (over 512 tokens); A plus as much again (the decode worker that got A holds A, the
    # rest is still over the threshold); a third, fresh one under 512 tokens
    prompts = [tok.encode(text) for text in (log, log + " " + days(28, 56), f"Log {uuid.uuid4().hex}. " + days(0, 21))]
    assert min(len(p) for p in prompts) >= DISAGG_THRESHOLD + 8 and len(prompts[0]) > 512 and len(prompts[1]) < 2000
    rng = np.random.default_rng(5)
    with RouterClient(vllm_server.grpc_url) as client:

        def prefill_worker_in_use() -> bool:  # the router adds it once it has reported its load
            probe = [int(t) for t in rng.integers(300, 4000, size=DISAGG_THRESHOLD + 8)]
            return client.generate(input_ids=probe, max_tokens=2)[-1]["worker"].startswith("prefill>")

        assert wait_for(prefill_worker_in_use, timeout=90, interval=1.0), "the router never used the prefill worker"
        for i, ids in enumerate(prompts):
            streamed = client.generate(input_ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True, stream=True)
            route = streamed[-1]["worker"]
            assert route.startswith("prefill>"), route
            if i == 1:  # the prefill worker's own prefix cache held A
                assert streamed[-1]["cached_tokens"] >= len(prompts[0]) // BLOCK * BLOCK - BLOCK, streamed[-1]
            assert len(streamed[0]["output_ids"]) == 1  # the prefill worker's token, sent at once
            handed = sum((r["output_ids"] for r in streamed), [])
            other = next(w for w in vllm_server.decode_models if w != route.split(">")[1])
            out = call_worker(vllm_server.grpc_url, other, input_ids=np.asarray(ids, np.int32), max_tokens=12,
                              temperature=0.0, ignore_eos=np.array([True]))
            alone = [int(t) for o in out for t in o["output_ids"]]
            assert handed == alone, (len(ids), route, other, tok.decode(handed), tok.decode(alone))
            assert streamed[-1]["finish_reason"] == "length" and streamed[-1]["num_input_tokens"] == len(ids)
    # every lease was released: the prefill worker's staging blocks are back
    assert wait_for(lambda: metric_values(vllm_server.metrics_url, "trident_kv_blocks_held").get("prefill") == 0,
                    timeout=10), metric_values(vllm_server.metrics_url, "trident_kv_blocks_held")
