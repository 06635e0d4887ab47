"""Configuration of the OpenAI frontend: one dataclass, built from flags and env vars.

Every flag `--some-flag` has the environment variable `TRIDENT_FRONTEND_SOME_FLAG`; a flag
given on the command line wins over the variable, the variable over the default.
`trident serve` builds a `FrontendConfig` directly (or passes its flags through
`parse_args`) and hands it to `frontend.main.run` / `frontend.app.create_app`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from trident.core.errors import ConfigError

ENV_PREFIX = "TRIDENT_FRONTEND_"
# Names every deployment answers to besides the engine's model id.
DEFAULT_ALIASES = ("router", "trident")


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """Settings of one frontend process.

    `model_names` are the ids `/v1/models` advertises and requests may name; empty means
    "ask the router model for the engine's model id at start-up". `aliases` are accepted
    in requests but not advertised. `default_max_tokens` applies when a request sets
    neither `max_tokens` nor `max_completion_tokens` (None: the router's default).
    Limits (`frontend.limits`): a larger body is a 413; a key with `max_streams_per_key`
    router streams open (one per prompt and choice; 0: no limit) gets 429s until one ends.
    """

    host: str = "127.0.0.1"
    port: int = 9000
    triton_url: str = "127.0.0.1:8001"
    router_model: str = "router"
    model_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = DEFAULT_ALIASES
    api_key: str | None = None
    triton_admin_key: str | None = None
    default_max_tokens: int | None = None
    max_n: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    max_streams_per_key: int = 0
    request_timeout_s: float = 600.0
    health_timeout_s: float = 5.0
    router_probe_s: float = 1.0
    log_level: str = "info"
    triton_metrics_url: str = ""

    @property
    def metrics_url(self) -> str:
        """Triton's /metrics: `triton_metrics_url`, else port 8002 on the gRPC host."""
        if self.triton_metrics_url:
            return self.triton_metrics_url
        host = self.triton_url.rsplit(":", 1)[0]
        return f"http://{host}:8002/metrics"

    def validate(self) -> FrontendConfig:
        """Raise `ConfigError` naming the first bad setting; return self for chaining."""
        if not self.host:
            raise ConfigError("host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in [0, 65535], got {self.port}")
        if ":" not in self.triton_url:
            raise ConfigError(f"triton_url: expected host:port, got {self.triton_url!r}")
        if not self.router_model:
            raise ConfigError("router_model: must not be empty")
        if any(not name for name in self.model_names + self.aliases):
            raise ConfigError("model_names: names must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key: must not be empty when given")
        if self.triton_admin_key is not None and not self.triton_admin_key:
            raise ConfigError("triton_admin_key: must not be empty when given")
        if self.default_max_tokens is not None and self.default_max_tokens <= 0:
            raise ConfigError(
                f"default_max_tokens: must be positive, got {self.default_max_tokens}"
            )
        if self.max_n < 1:
            raise ConfigError(f"max_n: must be >= 1, got {self.max_n}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes: must be >= 1, got {self.max_body_bytes}")
        if self.max_streams_per_key < 0:
            raise ConfigError(
                f"max_streams_per_key: must be >= 0 (0: no limit), got {self.max_streams_per_key}"
            )
        if self.request_timeout_s <= 0 or self.health_timeout_s <= 0:
            raise ConfigError("request_timeout_s/health_timeout_s: must be positive")
        if self.router_probe_s < 0:
            raise ConfigError(f"router_probe_s: must be >= 0 (0: no probes), got {self.router_probe_s}")
        if self.triton_metrics_url and not self.triton_metrics_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"triton_metrics_url: expected an http(s) URL, got {self.triton_metrics_url!r}"
            )
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        return self


_HELP = {
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to bind (default 9000; 0 picks a free one)",
    "triton_url": "Triton gRPC endpoint host:port (default 127.0.0.1:8001)",
    "router_model": "name of the router model in Triton (default router)",
    "model_names": "comma-separated model ids to advertise (default: the model the router "
    "config names, else the one TRIDENT_MODEL / the default model would load)",
    "aliases": "comma-separated extra names accepted in requests (default router,trident)",
    "api_key": "require 'Authorization: Bearer <key>' on /v1 routes",
    "triton_admin_key": "key of Triton's restricted model-repository API (optional; for /health)",
    "default_max_tokens": "max_tokens when a request gives none (default: router's default)",
    "max_n": "largest accepted n (choices per prompt, default 16)",
    "max_body_bytes": "largest accepted request body; larger is HTTP 413 (default 4194304)",
    "max_streams_per_key": "router streams (prompts x n) one API key may have open at once; "
    "more is HTTP 429 (default 0: no limit; without --api-key all clients share one key)",
    "request_timeout_s": "give up on a request after this many seconds (default 600)",
    "health_timeout_s": "timeout of the readiness and router liveness probes (default 5)",
    "router_probe_s": "while streams are open, probe the router this often and end with a 503 the "
    "streams a dead or restarted router stub will never answer (default 1; 0: off)",
    "log_level": "critical|error|warning|info|debug (default info)",
    "triton_metrics_url": "Triton's /metrics, read by the /console cluster view (default: "
    "http://<triton_url host>:8002/metrics)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m frontend",
        description="OpenAI-compatible HTTP frontend for Trident's router model. Every flag "
        f"also reads the environment variable {ENV_PREFIX}<FLAG_NAME>.",
    )
    for f in fields(FrontendConfig):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, dest=f.name, default=None, help=f"{_HELP[f.name]} [{ENV_PREFIX}{f.name.upper()}]"
        )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> FrontendConfig:
    """Build a validated config from flags (`argv`), then env vars, then defaults."""
    env = os.environ if env is None else env
    namespace = build_parser().parse_args(argv)
    raw: dict[str, str] = {}
    for f in fields(FrontendConfig):
        value = getattr(namespace, f.name)
        if value is None:
            value = env.get(ENV_PREFIX + f.name.upper())
        if value is not None:
            raw[f.name] = value
    return from_strings(raw)


def from_strings(raw: Mapping[str, str]) -> FrontendConfig:
    """Convert string settings (flags, env vars) to a validated `FrontendConfig`."""
    kwargs: dict[str, object] = {}
    for name, value in raw.items():
        try:
            kwargs[name] = _convert(name, value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return FrontendConfig(**kwargs).validate()  # type: ignore[arg-type]


def _convert(name: str, value: str) -> object:
    if name in ("port", "max_n", "max_body_bytes", "max_streams_per_key"):
        return int(value)
    if name in ("request_timeout_s", "health_timeout_s", "router_probe_s"):
        return float(value)
    if name == "default_max_tokens":
        return int(value) if value.strip() else None
    if name in ("model_names", "aliases"):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if name in ("api_key", "triton_admin_key"):
        return value or None
    return value
