"""Disaggregated prefill/decode on the real tritonserver: one prefill + one decode worker.

The module starts its own server (`trident serve --prefill 1 --decode 1` through the launcher,
a low disaggregation threshold, KV leases of a few seconds, float32 so that prefix-cache hits
cannot flip a greedy choice). The tests run in file order: the last two kill the decode worker
and stop the server.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.helpers import call_worker, generate, metric_values
from tests.waiting import wait_for
from trident.launcher import ENGINE_SHM_PREFIX, SHM_DIR, Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

logger = logging.getLogger(__name__)

THRESHOLD = 16  # uncached prompt tokens from which the router prefills remotely
LEASE_TTL_S = 4.0  # + the exporter's 2 s grace before it frees an expired lease
EXPIRY_WAIT_S = LEASE_TTL_S + 2.0 + 8.0

LONG = (
    "The old lighthouse keeper, Marguerite Olsen, had tended the lamp on Gull Rock for thirty-one "
    "years. Every evening she climbed the one hundred and twelve steps, trimmed the wick, polished "
    "the great Fresnel lens and wrote the weather in a leather logbook. Her brother Anders, a "
    "fisherman from the village of Skarvik, rowed out every Sunday with bread, coffee and news. In "
    "the winter of 1911 a storm drove the steamer Northern Star onto the reef below the rock; "
    "Marguerite and Anders pulled fourteen sailors from the water with a rope and a lantern, and "
    "the captain, a quiet Scot named Duncan Reid, stayed on the island until spring to repair his "
    "ship. The three of them played cards every night, argued about the tides, and planted a "
    "small garden of potatoes and rhubarb behind the keeper's cottage."
)
SUFFIX = (" Question: who are the three people in this story, what did each of them do during the "
          "storm, and what did they plant? Answer in two sentences.")
CHAT = json.dumps([{"role": "user", "content": "Explain in a few words why the sky looks blue on a clear day."}])
IDS = [int(x) for x in (np.arange(150) * 37 % 4000 + 300)]  # 150 pre-tokenized ids (10 blocks)
PROMPTS = [  # the third reuses the second's blocks on the prefill worker
    {"messages": CHAT}, {"text_input": LONG}, {"text_input": LONG + SUFFIX}, {"input_ids": IDS},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    tmp_dir = tmp_path_factory.mktemp("disagg-server")
    config = ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=1, prefill=1, disagg_threshold=THRESHOLD,
        kv_cache_mb=64, num_threads=1, dtype="float32", server_log=str(tmp_dir / "tritonserver.log"),
        log_level=os.environ.get("TRIDENT_TEST_LOG_LEVEL", "info"),
    )
    launcher = Launcher(config, progress=logger.info)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIDENT_LEASE_TTL_S", str(LEASE_TTL_S))  # the workers' engines read it at start
        try:
            launcher.start()
        except Exception as exc:
            pytest.fail(f"tritonserver did not start: {exc}")
    try:
        assert wait_for(lambda: _answers(launcher), timeout=30), "the router never answered"
        yield launcher
    finally:
        launcher.stop()


def _answers(launcher: Launcher) -> bool:
    """Whether the router serves a short prompt yet (KV routing admits a decode worker once it
    has reported its load). Short: the decode worker prefills it, nothing is cached."""
    return generate(_urls(launcher)[0], text_input="Hi", max_tokens=1).status_code == 200


def _urls(launcher: Launcher) -> tuple[str, str, str]:
    ep = launcher.endpoints
    assert ep is not None
    return ep.http_url, ep.grpc_url, ep.metrics_url


def _used(launcher: Launcher, worker: str) -> float:
    return metric_values(_urls(launcher)[2], "trident_kv_blocks_used").get(worker, -1.0)


def _prefill_with_lease(grpc_url: str, ids: list[int]) -> tuple[int, bytes]:
    out = call_worker(grpc_url, "prefill", input_ids=np.asarray(ids, np.int32), max_tokens=1,
                       temperature=0.0, hold_kv=np.array([True]))
    last = out[-1]
    assert last["finish_reason"][0] == b"length"
    descriptor = bytes(last["kv_descriptor"][0])
    assert descriptor, "the prefill worker returned no KV descriptor"
    return int(np.concatenate([o["output_ids"] for o in out])[0]), descriptor


def _stub_pid(launcher: Launcher, model: str) -> int:
    """The Python-backend stub running `model` on this launcher's server."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(f"/{model}/1/model.py".encode()) for a in args) and \
                any(a.startswith(launcher.shm_prefix.encode()) for a in args):
            return int(cmdline.parent.name)
    raise AssertionError(f"no stub process for {model}")


def test_prefill_failure_is_a_clear_error(server: Launcher) -> None:
    resp = generate(_urls(server)[0], input_ids=[100] * 8300, max_tokens=4)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "prefill worker prefill failed" in error and "prompt" in error, error
    assert _used(server, "prefill") == 0  # no lease was taken


def test_unpulled_and_refused_leases_expire(server: Launcher) -> None:
    from kv_manager.transfer.descriptor import decode_descriptor, encode_descriptor

    _, grpc_url, _ = _urls(server)
    _, unpulled = _prefill_with_lease(grpc_url, list(range(1000, 1100)))  # 7 blocks, nobody pulls
    first, refused = _prefill_with_lease(grpc_url, list(range(2000, 2050)))  # 4 blocks
    assert wait_for(lambda: _used(server, "prefill") == 11, timeout=5), _used(server, "prefill")
    assert decode_descriptor(unpulled).num_tokens == 100
    forged = encode_descriptor(replace(decode_descriptor(refused), fingerprint="0123456789abcdef"))
    with pytest.raises(InferenceServerException) as err:
        call_worker(grpc_url, "decode", input_ids=np.arange(2000, 2050, dtype=np.int32), max_tokens=4,
                     kv_descriptor=np.array([forged], dtype=np.object_), first_token=np.array([first], np.int32))
    message = str(err.value)
    assert "KV layout mismatch" in message and "0123456789abcdef" in message, message
    assert _used(server, "decode") == 0
    start = time.monotonic()
    assert wait_for(lambda: _used(server, "prefill") == 0, timeout=EXPIRY_WAIT_S), "expired leases free their blocks"
    assert time.monotonic() - start > LEASE_TTL_S - 2.0  # freed by expiry, not at once


def _greedy(client: RouterClient, prompt: dict[str, Any], stream: bool) -> list[dict[str, Any]]:
    return client.generate(max_tokens=16, temperature=0.0, ignore_eos=True, stream=stream, **prompt)


def test_disaggregated_equals_aggregated_token_for_token(server: Launcher) -> None:
    _, grpc_url, _ = _urls(server)
    with RouterClient(grpc_url) as client:
        disaggregated = [_greedy(client, p, stream=True) for p in PROMPTS]
        for prompt, responses in zip(PROMPTS, disaggregated, strict=True):
            assert {r["worker"] for r in responses} == {"prefill>decode"}, prompt
            assert len(responses[0]["output_ids"]) == 1  # the prefill worker's token, sent at once
        assert disaggregated[1][-1]["num_input_tokens"] > 160  # spans 10+ blocks of 16 tokens
        hit = disaggregated[2][-1]["cached_tokens"]
        assert hit >= 16 * (disaggregated[1][-1]["num_input_tokens"] // 16 - 1), hit  # prefix hit on prefill
        assert wait_for(lambda: _used(server, "prefill") == 0, timeout=5), "decode released every lease"

        # Aggregated: the same prompts with the prefill worker unloaded (the router's fallback:
        # its pool scan finds no prefill worker, or a call to it fails and a re-scan drops it).
        assert server.control is not None
        server.control.unload("prefill")
        assert wait_for(lambda: not server.control.is_ready("prefill"), timeout=30)
        try:
            aggregated = [_greedy(client, p, stream=False) for p in PROMPTS]
        finally:
            server.control.load("prefill")
        for prompt, responses in zip(PROMPTS, aggregated, strict=True):
            assert len(responses) == 1 and responses[0]["worker"] == "decode", prompt
        for prompt, dis, agg in zip(PROMPTS, disaggregated, aggregated, strict=True):
            dis_ids = sum((r["output_ids"] for r in dis), [])
            assert dis_ids == agg[0]["output_ids"], prompt
            assert "".join(r["text_output"] for r in dis) == agg[0]["text_output"], prompt
            assert len(dis_ids) == 16 and dis[-1]["finish_reason"] == agg[0]["finish_reason"] == "length"
        time.sleep(2.5)  # the router re-scans the prefill pool every 2 s
        fresh = "Once upon a time a small green dragon lived in a cave above a village of bakers and bell ringers."
        again = client.generate(text_input=fresh, max_tokens=2, temperature=0.0)
        assert again[-1]["worker"] == "prefill>decode", "the reloaded prefill worker is used again"


def test_a_shared_prefix_goes_to_the_prefill_worker_that_cached_it(server: Launcher) -> None:
    """Two prefill workers publishing KV events: a prompt sharing a long prefix with one a
    prefill worker computed earlier is prefilled by that worker (the decode pool's cost:
    overlap and load), whichever of the two it is."""
    assert server.control is not None
    load_prefill_1 = server._load_job("prefill_1", gpu=None, pool="prefill")
    load_prefill_1()
    _, grpc_url, metrics_url = _urls(server)
    rng = np.random.default_rng(7)
    try:
        with RouterClient(grpc_url) as client:

            assert wait_for(lambda: _prefill_pool_size(client, metrics_url, rng) == 2, timeout=30, interval=0.5), \
                "the router never saw prefill_1"
            # Prime each prefill worker's cache directly (not through the router) with its own
            # prefixes; their KV events reach the router's prefill index.
            owners: dict[str, list[list[int]]] = {"prefill": [], "prefill_1": []}
            for worker, prefixes in owners.items():
                for _ in range(2):
                    prefix = [int(t) for t in rng.integers(300, 4000, size=96)]  # 6 blocks
                    tail = [int(t) for t in rng.integers(300, 4000, size=8)]
                    call_worker(grpc_url, worker, input_ids=np.asarray(prefix + tail, np.int32), max_tokens=1)
                    prefixes.append(prefix)
            time.sleep(1.0)  # events are published every 10 ms; leave the router time to index them
            for worker, prefixes in owners.items():
                for prefix in prefixes:  # the tail alone is above the threshold: prefilled remotely
                    tail = [int(t) for t in rng.integers(300, 4000, size=40)]
                    responses = client.generate(input_ids=prefix + tail, max_tokens=2, temperature=0.0)
                    assert responses[-1]["worker"] == f"{worker}>decode", (worker, responses[-1]["worker"])
                    assert responses[-1]["cached_tokens"] >= 96, responses[-1]
    finally:
        server.control.unload("prefill_1")
        assert wait_for(lambda: not server.control.is_ready("prefill_1"), timeout=30)
        # Triton stops serving a model before the model says "leave": until the router has
        # dropped it, a prompt sent there falls back to a local prefill. Later tests expect
        # the prefill worker to be used, so wait until the router routes only to `prefill`.
        with RouterClient(grpc_url) as client:
            assert wait_for(lambda: _prefill_pool_size(client, metrics_url, rng) == 1, timeout=30, interval=0.5)


def _prefill_pool_size(client: RouterClient, metrics_url: str, rng: np.random.Generator) -> int:
    """Prefill workers the router routes to. A prompt above the threshold makes the router
    consult (and re-scan) the prefill pool; its metric flush reports the pool's size."""
    probe = [int(t) for t in rng.integers(300, 4000, size=THRESHOLD + 4)]
    client.generate(input_ids=probe, max_tokens=1)
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("trident_router_live_workers{") and 'pool="prefill"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_logprobs_and_penalties_survive_the_handoff(server: Launcher) -> None:
    """Disaggregated, the first token's logprobs and the prompt's come from the prefill
    worker and the rest from the decode worker, whose penalties count that first token:
    everything equals one decode worker serving the request alone (fp32)."""
    _, grpc_url, _ = _urls(server)
    sampling = dict(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2, frequency_penalty=1.5)
    ids = [int(x) for x in (np.arange(60) * 53 % 3000 + 1000)]  # cached nowhere yet
    with RouterClient(grpc_url) as client:
        responses = client.generate(input_ids=ids, stream=True, prompt_logprobs=1, **sampling)
    assert {r["worker"] for r in responses} == {"prefill>decode"}
    first = responses[0]
    assert len(first["output_ids"]) == len(first["output_logprobs"]) == 1  # from the prefill worker
    assert len(first["prompt_token_logprobs"]) == len(ids) - 1 and list(first["prompt_ids"]) == ids
    tokens = [t for r in responses for t in r["output_ids"]]
    logprobs = [x for r in responses for x in r["output_logprobs"]]
    top_ids = [t for r in responses for t in r["top_logprob_ids"]]
    alone = call_worker(grpc_url, "decode", input_ids=np.asarray(ids, np.int32), request_id="alone", **sampling)
    assert tokens == [int(t) for o in alone for t in o["output_ids"]]
    expected = [float(x) for o in alone for x in o["output_logprobs"]]
    assert logprobs == pytest.approx(expected, abs=1e-3)
    assert top_ids == [int(t) for o in alone for t in o["top_logprob_ids"]]
    assert wait_for(lambda: _used(server, "prefill") == 0, timeout=5)


def test_decode_killed_mid_handoff_strands_no_prefill_blocks(server: Launcher) -> None:
    _, grpc_url, _ = _urls(server)
    decode_pid = _stub_pid(server, "decode")
    os.kill(decode_pid, signal.SIGSTOP)  # frozen: it cannot pull the KV the router hands it
    responses: queue.Queue[Any] = queue.Queue()

    def client_thread() -> None:
        try:
            with RouterClient(grpc_url) as client:
                prompt = "Write a long letter to a friend about a journey through the northern mountains."
                for r in client.stream(text_input=prompt * 3, max_tokens=200, ignore_eos=True, stream=True, timeout=60):
                    responses.put(r)
            responses.put(None)
        except Exception as exc:  # the expected end: the decode worker died
            responses.put(exc)

    thread = threading.Thread(target=client_thread, daemon=True)
    thread.start()
    try:
        first = responses.get(timeout=60)
        assert isinstance(first, dict) and first["worker"] == "prefill>decode", str(first)
        assert len(first["output_ids"]) == 1
        assert wait_for(lambda: _used(server, "prefill") > 0, timeout=5), "the prompt's blocks are leased"
    finally:
        os.kill(decode_pid, signal.SIGKILL)
        os.kill(decode_pid, signal.SIGCONT)
    end = responses.get(timeout=60)
    assert isinstance(end, Exception) and "decode" in str(end), end
    assert wait_for(lambda: _used(server, "prefill") == 0, timeout=EXPIRY_WAIT_S), "the lease expired"
    thread.join(10)


def test_no_shared_memory_left_after_the_server_exits(server: Launcher) -> None:
    prefill_pid = _stub_pid(server, "prefill")
    kv_segments = sorted(SHM_DIR.glob(f"{ENGINE_SHM_PREFIX}{prefill_pid}_*"))
    regions = sorted(SHM_DIR.glob(server.shm_prefix + "*"))
    assert kv_segments, "the prefill worker's KV pool is a shared-memory segment"
    assert len(regions) >= 3  # router, prefill, decode (killed above: its region is orphaned)
    server.stop()
    assert not [p for p in kv_segments + regions if p.exists()]
    assert not list(SHM_DIR.glob(server.shm_prefix + "*"))
