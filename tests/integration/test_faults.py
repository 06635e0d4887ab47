"""Faults injected into a real server (2 decode workers, 1 prefill worker): a killed decode
stub, a prefill stub killed between the first token and the handoff, a worker frozen with
SIGSTOP, a worker unloaded mid-stream, a client that reads very slowly, and a killed router
stub (the OpenAI frontend ends its stream with an error). Each asserts that nothing
hangs, that no KV blocks, leases or shared-memory segments are left, and that the server
keeps serving. Its own server: it kills processes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tritonclient.utils import InferenceServerException

from frontend.args import FrontendConfig
from frontend.main import serve_in_thread
from tests.integration.helpers import call_worker, metric_values, orphan_kv_segments, stub_pid
from tests.waiting import wait_until
from trident.launcher import Endpoints, Launcher, group_pids
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

pytestmark = pytest.mark.timeout(900)

THRESHOLD = 96  # prompts with this many uncached tokens are prefilled on the prefill worker
STORY = "Tell me a long story about a lighthouse keeper and the sea."
LONG_PROMPT = " ".join(f"Fact {i}: the tide at harbour {i} rose by {i % 7} feet." for i in range(14))
GAUGES_AT_REST = ("trident_kv_blocks_used", "trident_kv_blocks_held", "trident_kv_leases_active",
                  "trident_requests_inflight")


@dataclass
class Server:
    launcher: Launcher
    ep: Endpoints

    def stub(self, model: str) -> int:
        return stub_pid(self.launcher, model)

    def greedy(self, prompt: str, n: int, **extra: Any) -> dict[str, Any]:
        """One undisturbed greedy run: its tokens and the workers that served it."""
        with RouterClient(self.ep.grpc_url) as client:
            out = client.generate(text_input=prompt, max_tokens=n, temperature=0.0, ignore_eos=True, **extra)
        return {"ids": [t for r in out for t in list(r["output_ids"])], "worker": out[-1]["worker"]}

    def wait_serving(self, model: str) -> None:
        """Until `model` has a live stub again (the supervisor restarted it) and is READY."""
        wait_until(lambda: _has_stub(self.launcher, model) and self.launcher.control.is_ready(model), timeout=120)

    def assert_at_rest(self) -> None:
        """No request, block, lease or orphaned shared-memory segment is left anywhere."""
        def rest() -> bool:
            for name in GAUGES_AT_REST:
                values = metric_values(self.ep.metrics_url, name)
                if not values or any(v != 0 for v in values.values()):
                    return False
            return not orphan_kv_segments()
        try:
            wait_until(rest, timeout=45)
        except AssertionError:
            raise AssertionError({n: metric_values(self.ep.metrics_url, n) for n in GAUGES_AT_REST}
                                 | {"orphans": orphan_kv_segments()}) from None


def _has_stub(launcher: Launcher, model: str) -> bool:
    try:
        stub_pid(launcher, model)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("faults") / "tritonserver.log"
    config = ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=2, prefill=1, disagg_threshold=THRESHOLD,
        kv_cache_mb=48, num_threads=1, dtype="float32", server_log=str(log), startup_timeout_s=600.0,
    )
    launcher = Launcher(config)
    ep = launcher.start()
    try:
        yield Server(launcher, ep)
    except Exception:
        print(Path(log).read_text()[-6000:])
        raise
    finally:
        launcher.stop(grace_s=5.0)


def _stream_in_thread(server: Server, prompt: str, n: int, on_first: Any = None) -> dict[str, Any]:
    """Stream one greedy request; call `on_first(first_response)` after its first response;
    return its tokens, workers and outcome. Fails the test if it does not end within 90 s."""
    result: dict[str, Any] = {"ids": [], "workers": [], "error": None}

    def read() -> None:
        try:
            with RouterClient(server.ep.grpc_url) as client:
                stream = client.stream(text_input=prompt, max_tokens=n, temperature=0.0, ignore_eos=True, stream=True)
                for i, response in enumerate(stream):
                    result["ids"] += list(response["output_ids"])
                    result["workers"].append(response["worker"])
                    result["finish_reason"] = response["finish_reason"]
                    if i == 0 and on_first is not None:
                        on_first(response)
        except InferenceServerException as exc:
            result["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=90)
    assert not reader.is_alive(), f"the request hangs: {result}"
    return result


def test_a_decode_worker_killed_mid_stream_is_migrated(server: Server) -> None:
    expected = server.greedy(STORY, 80)
    victim: dict[str, str] = {}

    def kill(first: dict[str, Any]) -> None:
        victim["worker"] = first["worker"]
        os.kill(server.stub(first["worker"]), signal.SIGKILL)

    got = _stream_in_thread(server, STORY, 80, on_first=kill)
    assert got["error"] is None, got["error"]
    assert got["ids"] == expected["ids"]  # one unbroken stream, the undisturbed run's tokens
    assert got["finish_reason"] == "length"
    assert got["workers"][-1] != victim["worker"]  # finished elsewhere
    migrations = _router_counter(server, "trident_router_migrations_total", 'cause="gone"')
    assert migrations >= 1
    server.wait_serving(victim["worker"])  # the supervisor loaded it again
    assert server.launcher.supervisor is not None and server.launcher.supervisor.restarts[victim["worker"]] >= 1
    server.assert_at_rest()
    assert server.greedy(STORY, 8)["ids"] == expected["ids"][:8]


def test_a_prefill_worker_killed_after_the_first_token(server: Server) -> None:
    expected = server.greedy(LONG_PROMPT, 24)
    assert expected["worker"].startswith("prefill>"), expected  # the prompt is disaggregated

    def kill(first: dict[str, Any]) -> None:
        os.kill(server.stub("prefill"), signal.SIGKILL)

    got = _stream_in_thread(server, LONG_PROMPT + " Again.", 24, on_first=kill)
    reference = server.greedy(LONG_PROMPT + " Again.", 24)  # prefill gone: a decode worker computes it
    assert got["error"] is None, got["error"]
    assert got["ids"] == reference["ids"]
    server.wait_serving("prefill")
    server.assert_at_rest()
    assert server.greedy(LONG_PROMPT, 24)["ids"] == expected["ids"]


def test_a_frozen_worker_is_left_and_resumes(server: Server) -> None:
    expected = server.greedy(STORY + " Slowly.", 60)
    frozen: dict[str, int] = {}

    def freeze(first: dict[str, Any]) -> None:
        frozen["pid"] = pid = server.stub(first["worker"])
        frozen["worker"] = first["worker"]
        os.kill(pid, signal.SIGSTOP)

    try:
        got = _stream_in_thread(server, STORY + " Slowly.", 60, on_first=freeze)
    finally:
        time.sleep(2)
        os.kill(frozen["pid"], signal.SIGCONT)
    assert got["error"] is None, got["error"]
    assert got["ids"] == expected["ids"] and got["workers"][-1] != frozen["worker"]
    # resumed, the worker aborts the request it was serving, and is routed to again
    server.assert_at_rest()
    assert server.stub(frozen["worker"]) == frozen["pid"]  # the same process, not a restart
    with RouterClient(server.ep.grpc_url) as client:
        wait_until(lambda: frozen["worker"] in {
            client.generate(text_input=f"Hi {i}", max_tokens=2)[-1]["worker"] for i in range(4)}, timeout=60)


def test_a_worker_unloaded_mid_stream_loses_nothing(server: Server) -> None:
    """The planner's drain past its timeout: the worker is unloaded with the request in
    flight. Its tokens are those of an undisturbed run, wherever they were produced."""
    expected = server.greedy(STORY + " Twice.", 60)
    unloaded: dict[str, str] = {}

    def unload(first: dict[str, Any]) -> None:
        unloaded["worker"] = first["worker"]
        server.launcher.control.unload(first["worker"])

    got = _stream_in_thread(server, STORY + " Twice.", 60, on_first=unload)
    assert got["error"] is None, got["error"]
    assert got["ids"] == expected["ids"]
    wait_until(lambda: not server.launcher.control.is_ready(unloaded["worker"]), timeout=60)
    server.launcher.reload_worker(unloaded["worker"])
    server.wait_serving(unloaded["worker"])
    server.assert_at_rest()


def test_a_very_slow_reader_holds_little_memory(server: Server) -> None:
    rss_before = _server_rss(server)
    url = f"{server.ep.http_url}/v2/models/router/generate_stream"
    body = {"text_input": STORY, "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0.0}
    events = 0
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        started = time.monotonic()
        # meanwhile other clients are served at full speed
        assert server.greedy("Hello!", 16)["ids"]
        for line in response.iter_lines():
            if line.startswith("data:"):
                events += 1
                if events % 20 == 0:
                    time.sleep(0.5)  # about 10 s of stalls in all
        assert time.monotonic() - started > 5
    assert events >= 300
    growth_mb = (_server_rss(server) - rss_before) / 2**20
    assert growth_mb < 64, f"the server grew {growth_mb:.0f} MiB for one slow reader"
    server.assert_at_rest()


def test_a_killed_router_stub_is_restarted(server: Server) -> None:
    """Triton 2.51 neither restarts the stub nor answers the requests in flight on it: the
    launcher's supervisor loads the router again; the OpenAI frontend's router watch ends its
    stream with a 503 error event at once, and a direct Triton client's timeout ends its own."""
    result: dict[str, Any] = {}
    frontend = serve_in_thread(FrontendConfig(port=0, triton_url=server.ep.grpc_url, log_level="warning"))
    openai_client = openai.OpenAI(base_url=frontend.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    via_openai: dict[str, Any] = {}

    def read() -> None:
        try:
            with RouterClient(server.ep.grpc_url) as client:
                for response in client.stream(text_input=STORY, max_tokens=300, ignore_eos=True, stream=True,
                                              timeout=20):
                    result.setdefault("worker", response["worker"])
            result["finished"] = True
        except Exception as exc:
            result["error"] = str(exc)

    def read_openai() -> None:
        try:
            chunks = openai_client.completions.create(model="router", prompt=STORY, max_tokens=300, stream=True,
                                                      extra_body={"ignore_eos": True})
            for _ in chunks:
                via_openai.setdefault("first", time.monotonic())
            via_openai["finished"] = True
        except openai.APIError as exc:
            via_openai["error"], via_openai["ended"] = str(exc), time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    openai_reader = threading.Thread(target=read_openai, daemon=True)
    openai_reader.start()
    wait_until(lambda: "worker" in result and "first" in via_openai, timeout=60)
    old = server.stub("router")
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    openai_reader.join(timeout=30)
    frontend.stop()
    assert not openai_reader.is_alive() and "router" in via_openai.get("error", ""), via_openai
    assert via_openai["ended"] - killed < 15, via_openai
    server.wait_serving("router")
    assert server.stub("router") != old and server.launcher.supervisor.restarts["router"] == 1
    # Each worker that was streaming to the dead stub (the direct client's, and the OpenAI
    # stream's, which may be the other one) blocks in its next response send for good
    # (Triton 2.51 never drains the dead requester's queue): it stops its load reports at
    # once, so routers drop it, and its watchdog ends its stub after SEND_WEDGED_S; the
    # supervisor then loads it again. Afterwards every decode worker answers: a wedged one
    # that has not been restarted yet answers once it has.
    wedged = result["worker"]
    wait_until(lambda: server.launcher.supervisor.restarts[wedged] >= 1, timeout=90)
    for worker in server.launcher.decode_models:
        wait_until(lambda w=worker: _answers(server, w), timeout=150)
    with RouterClient(server.ep.grpc_url) as client:  # both workers are routed to again
        wait_until(lambda: _router_counter(server, "trident_router_live_workers", 'pool="decode"') == 2,
                   tick=lambda: client.generate(text_input="Probe.", max_tokens=1), timeout=60)
        served = {client.generate(text_input=f"Hello again {i}!", max_tokens=4)[-1]["worker"] for i in range(3)}
    assert served <= set(server.launcher.decode_models), served
    reader.join(timeout=60)
    assert not reader.is_alive() and "error" in result, result  # the direct client's timeout
    server.assert_at_rest()


def _answers(server: Server, worker: str, timeout_s: float = 30.0) -> bool:
    """Whether a direct call to `worker` is answered within `timeout_s` (a wedged one hangs;
    one that is not serving, or whose stub ends under the call, fails at once)."""
    ended = threading.Event()
    answered: list[bool] = []

    def call() -> None:
        try:
            call_worker(server.ep.grpc_url, worker, input_ids=[1, 2, 3, 4], max_tokens=3)
            answered.append(True)
        except Exception as exc:
            logging.getLogger(__name__).info("worker %s: %s", worker, exc)
        finally:
            ended.set()

    threading.Thread(target=call, daemon=True).start()
    return ended.wait(timeout_s) and bool(answered)


def _router_counter(server: Server, name: str, label: str) -> float:
    text = httpx.get(server.ep.metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line)


def _server_rss(server: Server) -> int:
    assert server.launcher._proc is not None
    total = 0
    for pid in group_pids(server.launcher._proc.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total

