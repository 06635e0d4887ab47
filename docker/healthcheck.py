"""The container's health check (Docker HEALTHCHECK, compose, the Kubernetes readiness probe).

Exit 0 when the service answers requests, 1 otherwise, with the reason on stderr. What is
checked follows the node's role, read from the same `TRIDENT_*` variables `trident serve`
read (`ServeConfig.from_env`: `TRIDENT_ROLE`, `TRIDENT_DECODE`, `TRIDENT_PREFILL`), so there
is no second list of models to keep in step:

- always Triton's `/v2/health/ready` (the server is up and every loaded model is ready);
- the models `trident serve` loads, each `/v2/models/<name>/ready`: it loads them in explicit
  mode, so the server alone reports ready in the moment between starting and the first load.
  A server with the router (`both`, `router`) checks the router; a worker node
  (`--role worker`: no router, no frontend) checks its workers, `decode`, `decode_1`, ...
  and `prefill`, `prefill_1`, ...;
- the OpenAI frontend, unless it is off (`TRIDENT_OPENAI_PORT=-1`) or the node is a worker:
  its `/health/ready` (router and a worker ready, as the frontend sees them). The frontend
  counts only this server's worker models, so on a router-only node (`--role router`, no
  local decode or prefill worker: every worker is on another node) it never reads ready;
  there its `/health/live` is checked instead.

Ports and address come from those variables too; a wildcard bind address is checked on
loopback. Proxies from the environment are ignored: the checks never leave the container.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from trident.core.errors import ConfigError
from trident.core.names import replica_names
from trident.serve_config import ServeConfig

TIMEOUT_S = 3.0
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}


def models(config: ServeConfig) -> list[str]:
    """The models that must be ready: the router, or on a worker node its workers."""
    if config.role == "worker":
        return replica_names("decode", config.decode) + replica_names("prefill", config.prefill)
    return ["router"]


def urls(config: ServeConfig) -> list[str]:
    """What must answer 200, in order."""
    host = _LOOPBACK.get(config.host, f"[{config.host}]" if ":" in config.host else config.host)
    triton = f"http://{host}:{config.http_port}"
    checks = [f"{triton}/v2/health/ready"]
    checks += [f"{triton}/v2/models/{m}/ready" for m in models(config)]
    if config.role != "worker" and config.openai_port >= 0:
        local_workers = config.decode + config.prefill > 0
        path = "/health/ready" if local_workers else "/health/live"
        checks.append(f"http://{host}:{config.openai_port}{path}")
    return checks


def main() -> int:
    try:
        config = ServeConfig.from_env()
    except ConfigError as exc:
        sys.stderr.write(f"healthcheck: bad setting: {exc}\n")
        return 1
    if config.http_port == 0 or (config.role != "worker" and config.openai_port == 0):
        sys.stderr.write("healthcheck: a port of 0 (picked at start) cannot be checked; set it\n")
        return 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in urls(config):
        try:
            with opener.open(url, timeout=TIMEOUT_S) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:  # URLError, refused, timed out
            sys.stderr.write(f"healthcheck: {url}: {exc}\n")
            return 1
        if status != 200:
            sys.stderr.write(f"healthcheck: {url}: HTTP {status}\n")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
