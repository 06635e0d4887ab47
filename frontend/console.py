"""The web console: a chat playground and a live cluster view, served by the frontend.

`install_console(app, config, client, authed)` is called once by `frontend.app.create_app`.
It adds, on the frontend's own host and port:

- `GET /console` and `GET /console/static/{name}`: the page (frontend/console/*, plain
  HTML/JS/CSS, nothing fetched from elsewhere). They carry no data and no key, so they are
  served without one; everything the page shows comes from keyed routes.
- `GET /console/api/cluster` (the `/v1` API key rule, `authed`): the cluster view's JSON,
  built from the router's readiness probes and one scrape of Triton's `/metrics`
  (`FrontendConfig.metrics_url`): workers by role with KV blocks used/capacity per tier,
  running/waiting requests, finished requests and TTFT sums/counts (the page turns two polls
  into a recent TTFT), and the router's prefix hit ratios.

The chat itself goes through `/v1/chat/completions` with `stream_options.include_usage`; the
usage chunk's `trident.workers` names the workers behind the answer (`frontend.serving`).
Handlers run on the event loop thread; the scrape is an async HTTP call.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from frontend.args import FrontendConfig
from frontend.triton_client import RouterClient
from trident.core.names import parse_replica

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "console"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_SAMPLE = re.compile(r"^(?P<name>trident_[\w]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
WORKER_GAUGES = {  # metric -> field of a worker in the JSON
    "trident_kv_blocks_used": "kv_used",
    "trident_kv_blocks_capacity": "kv_capacity",
    "trident_requests_running": "running",
    "trident_requests_waiting": "waiting",
    "trident_requests_total": "requests",
    "trident_generation_tokens_total": "generated_tokens",
    "trident_time_to_first_token_seconds_sum": "ttft_sum_s",
    "trident_time_to_first_token_seconds_count": "ttft_count",
}


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The `trident_*` samples of a Prometheus exposition as (name, labels, value)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        out.append((m["name"], dict(_LABEL.findall(m["labels"] or "")), value))
    return out


def cluster_view(
    samples: list[tuple[str, dict[str, str], float]], ready: tuple[str, ...]
) -> dict[str, Any]:
    """The cluster JSON from one scrape and the router's list of ready workers."""
    workers: dict[str, dict[str, Any]] = {}

    def worker(name: str) -> dict[str, Any]:
        if name not in workers:
            parsed = parse_replica(name)
            workers[name] = {
                "name": name,
                "role": parsed[0] if parsed else "worker",
                "ready": name in ready,
                "tiers": {},
                **{field: 0.0 for field in WORKER_GAUGES.values()},
            }
        return workers[name]

    hit: dict[str, dict[str, float]] = {}
    live: dict[str, float] = {}
    for name, labels, value in samples:
        if "worker" in labels and name in WORKER_GAUGES:
            worker(labels["worker"])[WORKER_GAUGES[name]] = value
        elif name == "trident_kv_tier_blocks" and "worker" in labels:
            worker(labels["worker"])["tiers"][labels.get("medium", "?")] = value
        elif name == "trident_router_cache_hit_ratio":
            hit.setdefault(labels.get("pool", ""), {})[labels.get("kind", "")] = value
        elif name == "trident_router_live_workers":
            live[labels.get("pool", "")] = value
    for name in ready:
        worker(name)
    roles: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(workers):
        roles.setdefault(workers[name]["role"], []).append(workers[name])
    return {"roles": roles, "hit_ratio": hit, "live_workers": live}


def install_console(
    app: FastAPI, config: FrontendConfig, client: RouterClient, authed: list[Any]
) -> None:
    """Add the console's routes to `app` (see the module docstring)."""

    @app.get("/console", include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/console/static/{name}", include_in_schema=False)
    async def console_static(name: str) -> FileResponse:
        path = STATIC / name
        if (
            "/" in name
            or name.startswith(".")
            or path.suffix not in MEDIA_TYPES
            or not path.is_file()
        ):
            raise HTTPException(404, f"no console file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    @app.get("/console/api/cluster", dependencies=authed, include_in_schema=False)
    async def console_cluster() -> dict[str, Any]:
        state = await client.readiness()
        error = state.error
        samples: list[tuple[str, dict[str, str], float]] = []
        try:
            async with httpx.AsyncClient(timeout=config.health_timeout_s) as http:
                response = await http.get(config.metrics_url)
                response.raise_for_status()
                samples = parse_samples(response.text)
        except httpx.HTTPError as exc:
            logger.warning("console: cannot read %s: %s", config.metrics_url, exc)
            error = error or f"cannot read {config.metrics_url}: {exc}"
        view = cluster_view(samples, tuple(state.workers))
        view.update(router_ready=state.router_ready, error=error, metrics_url=config.metrics_url)
        return view
