"""The container's health check (Docker HEALTHCHECK, compose, the Kubernetes readiness probe).

Exit 0 when the service answers requests, 1 otherwise, with the reason on stderr. Ready means:

- Triton's `/v2/health/ready` (the server is up and every loaded model is ready);
- `/v2/models/router/ready`: `trident serve` loads models in explicit mode, so the server alone
  reports ready in the moment between starting and the first load;
- the OpenAI frontend's `/health/ready` (router and a worker ready, as the frontend sees them),
  unless the frontend is off (`TRIDENT_OPENAI_PORT=-1`).

Ports and address come from the same `TRIDENT_*` variables `trident serve` read
(`ServeConfig.from_env`); a wildcard bind address is checked on loopback. Proxies from the
environment are ignored: the checks never leave the container.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from trident.core.errors import ConfigError
from trident.serve_config import ServeConfig

TIMEOUT_S = 3.0
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}


def urls(config: ServeConfig) -> list[str]:
    """What must answer 200, in order."""
    host = _LOOPBACK.get(config.host, f"[{config.host}]" if ":" in config.host else config.host)
    triton = f"http://{host}:{config.http_port}"
    checks = [f"{triton}/v2/health/ready", f"{triton}/v2/models/router/ready"]
    if config.openai_port >= 0:
        checks.append(f"http://{host}:{config.openai_port}/health/ready")
    return checks


def main() -> int:
    try:
        config = ServeConfig.from_env()
    except ConfigError as exc:
        sys.stderr.write(f"healthcheck: bad setting: {exc}\n")
        return 1
    if config.http_port == 0 or config.openai_port == 0:
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
