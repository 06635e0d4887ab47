"""The planner's own `/metrics`: what it saw and what it decided, for dashboards.

`PlannerExporter(loop, host, port)` is started by `planner.main` when `exporter_port` is set
(0 = off). A `ThreadingHTTPServer` on a daemon thread answers `GET /metrics` by rendering
the loop's latest `Record` and its decision counts; the loop's thread only appends to
`loop.records` (a deque), and `render` reads a snapshot of it, so no lock is shared.

Families (text exposition format 0.0.4):
- `trident_planner_replicas{pool}`: serving replicas at the last decision;
- `trident_planner_target_replicas{pool}`: the replicas the last decision asked for;
- `trident_planner_decisions_total{pool, direction}`: decisions since start, `direction` one
  of `up`, `down`, `hold` (a decision taken while a change was under way counts as `hold`);
- `trident_planner_predicted_ttft_seconds`, `trident_planner_predicted_itl_seconds`: what the
  mode expects at the targets (absent until a decision predicts one);
- `trident_planner_observed_request_rate`: requests per second in the last window.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from trident.core.errors import ConfigError

if TYPE_CHECKING:
    from planner.loop import PlannerLoop, Record

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAMILIES = {  # name -> (type, help)
    "trident_planner_replicas": ("gauge", "Serving replicas per pool at the last decision"),
    "trident_planner_target_replicas": ("gauge", "Replicas per pool the last decision asked for"),
    "trident_planner_decisions_total": ("counter", "Planner decisions per pool and direction"),
    "trident_planner_predicted_ttft_seconds": (
        "gauge",
        "Mean TTFT the mode expects at the targets",
    ),
    "trident_planner_predicted_itl_seconds": ("gauge", "Mean ITL the mode expects at the targets"),
    "trident_planner_observed_request_rate": ("gauge", "Requests per second in the last window"),
}


def direction(record: Record, pool: str) -> str:
    current, target = record.replicas.get(pool, 0), record.decision.targets.get(pool, 0)
    if record.acting or target == current:
        return "hold"
    return "up" if target > current else "down"


def render(records: list[Record], pools: tuple[str, ...]) -> str:
    """The exposition of `records` (oldest first); called on an HTTP handler thread."""
    decisions: Counter[tuple[str, str]] = Counter()
    for record in records:
        for pool in pools:
            decisions[(pool, direction(record, pool))] += 1
    samples: dict[str, list[str]] = {name: [] for name in FAMILIES}
    for pool in pools:
        for d in ("up", "down", "hold"):
            line = f'trident_planner_decisions_total{{pool="{pool}",direction="{d}"}} {decisions[(pool, d)]}'
            samples["trident_planner_decisions_total"].append(line)
    if records:
        last = records[-1]
        for pool in pools:
            samples["trident_planner_replicas"].append(
                f'trident_planner_replicas{{pool="{pool}"}} {last.replicas.get(pool, 0)}'
            )
            samples["trident_planner_target_replicas"].append(
                f'trident_planner_target_replicas{{pool="{pool}"}} {last.decision.targets.get(pool, 0)}'
            )
        for name, value in (
            ("trident_planner_predicted_ttft_seconds", last.decision.predicted_ttft_s),
            ("trident_planner_predicted_itl_seconds", last.decision.predicted_itl_s),
            ("trident_planner_observed_request_rate", last.window.request_rate),
        ):
            if value is not None:
                samples[name].append(f"{name} {float(value)!r}")
    lines: list[str] = []
    for name, (kind, help_text) in FAMILIES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


class PlannerExporter:
    """Serves `render(loop.records)` on `host:port`; `port` 0 picks a free one (see `.port`)."""

    def __init__(self, loop: PlannerLoop, host: str, port: int) -> None:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("planner exporter: " + format, *args)

        self.loop = loop
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"exporter_port: cannot listen on {host}:{port}: {exc}") from None
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="planner-exporter", daemon=True
        )

    def render(self) -> str:
        return render(list(self.loop.records), self.loop.config.pools)

    def start(self) -> PlannerExporter:
        self._thread.start()
        logger.info("planner: metrics on port %d", self.port)
        return self

    def stop(self) -> None:
        """Safe to call twice, and before `start`."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
