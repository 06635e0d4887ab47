"""OpenTelemetry traces of a disaggregated request, read back from an OTLP/HTTP receiver in
this process: the real frontend (in a thread here), the router and the prefill and decode
workers (Triton stubs) export to it, and one request's spans form one trace with a span per
hop, parented frontend -> router -> prefill / decode -> KV transfer. Tracing stays off (no
provider, a shared no-op context) without an endpoint."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from frontend.args import FrontendConfig
from frontend.main import BackgroundFrontend, serve_in_thread
from tests.waiting import wait_for
from trident.core import tracing
from trident.launcher import Launcher
from trident.serve_config import ServeConfig

logger = logging.getLogger(__name__)
PROMPT = "Tell me about lighthouses, their keepers and the storms they saw. " * 4  # > threshold


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource in request.resource_spans:
                        service = next(
                            a.value.string_value
                            for a in resource.resource.attributes
                            if a.key == "service.name"
                        )
                        for scope in resource.scope_spans:
                            for s in scope.spans:
                                receiver.spans.append(
                                    {
                                        "service": service,
                                        "name": s.name,
                                        "trace": s.trace_id.hex(),
                                        "id": s.span_id.hex(),
                                        "parent": s.parent_span_id.hex(),
                                        "start": s.start_time_unix_nano,
                                        "end": s.end_time_unix_nano,
                                        "attributes": {
                                            a.key: a.value.string_value for a in s.attributes
                                        },
                                    }
                                )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_request(self, request_id: str) -> list[dict]:
        with self.lock:
            ids = {
                s["trace"]
                for s in self.spans
                if s["attributes"].get("trident.request_id", "").startswith(request_id)
            }
            return [s for s in self.spans if s["trace"] in ids]


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Receiver, BackgroundFrontend]]:
    tmp: Path = tmp_path_factory.mktemp("traced")
    receiver = Receiver()
    config = ServeConfig(
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        decode=1,
        prefill=1,
        disagg_threshold=16,
        kv_cache_mb=64,
        num_threads=1,
        server_log=str(tmp / "tritonserver.log"),
        openai_port=-1,
    )
    launcher = Launcher(config, progress=logger.info)
    frontend = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 0.2 s, not 5 s
        try:
            ep = launcher.start()
            frontend = serve_in_thread(
                FrontendConfig(port=0, triton_url=ep.grpc_url, log_level="warning")
            )
        except Exception as exc:
            launcher.stop()
            pytest.fail(f"the traced stack did not start: {exc}")
    try:
        yield receiver, frontend
    finally:
        frontend.stop()
        launcher.stop()
        tracing.shutdown()  # this process's provider: later tests run untraced
        receiver.server.shutdown()


def test_a_disaggregated_request_is_one_trace_with_a_span_per_hop(
    traced: tuple[Receiver, BackgroundFrontend],
) -> None:
    receiver, frontend = traced
    body = {"model": "trident", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
    r = httpx.post(f"{frontend.base_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["trident"]["workers"][0].startswith("prefill>"), (
        r.json()
    )  # it was disaggregated
    request_id = r.json()["id"]

    names = ("frontend.request", "router.request", "prefill", "decode", "kv_transfer")

    def complete() -> bool:
        return {s["name"] for s in receiver.of_request(request_id)} >= set(names)

    assert wait_for(complete, timeout=30, interval=0.2), (
        receiver.of_request(request_id) or receiver.spans[-10:]
    )
    spans = receiver.of_request(request_id)
    assert len({s["trace"] for s in spans}) == 1
    by_name = {s["name"]: s for s in spans}
    by_id = {s["id"]: s for s in spans}
    root = by_name["frontend.request"]
    assert root["parent"] == "" and root["service"] == "trident-frontend"
    assert by_name["router.request"]["parent"] == root["id"]
    assert by_name["router.request"]["service"] == "trident-router"
    for hop in ("prefill", "decode"):
        call = by_id[by_name[hop]["parent"]]
        assert (
            call["name"] == "router.call" and call["parent"] == by_name["router.request"]["id"]
        ), hop
        assert call["attributes"]["trident.worker"] == by_name[hop]["attributes"]["trident.worker"]
        assert by_name[hop]["service"] == f"trident-{by_name[hop]['attributes']['trident.worker']}"
    assert by_name["kv_transfer"]["parent"] == by_name["decode"]["id"]
    assert by_name["prefill"]["end"] <= by_name["kv_transfer"]["end"] <= by_name["decode"]["end"]
    for s in spans:
        assert root["start"] <= s["start"] <= s["end"], s


def test_tracing_is_off_without_an_endpoint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    assert tracing.endpoint(env) == ""
    assert (
        tracing.endpoint(
            {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}
        )
        == ""
    )
    assert (
        tracing.endpoint({**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x/v1/traces"})
        == "http://x/v1/traces"
    )
