"""The planner's one configuration: a frozen dataclass, every field a `--kebab-case` flag and
a `TRIDENT_PLANNER_<FIELD>` environment variable (`trident.core.flags`).

The model-repository key is never a flag: it comes from `admin_key_file` or the
`TRIDENT_PLANNER_ADMIN_KEY` environment variable (`trident serve --planner` sets that).
The pure core (`planner.core`) reads the policy fields; `planner.main` the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trident.core.errors import ConfigError

ENV_PREFIX = "TRIDENT_PLANNER_"
ADMIN_KEY_ENV = ENV_PREFIX + "ADMIN_KEY"
MODES = ("load", "sla")
CONNECTORS = ("triton", "advisory", "kubernetes")
FORECASTS = ("constant", "trend")

HELP = {
    "mode": "load (reactive: latency vs live load) or sla (predictive: forecast demand against a profile)",
    "ttft_target_ms": "time-to-first-token target (mean over a window)",
    "itl_target_ms": "inter-token latency target (mean over a window)",
    "headroom": "plan for this fraction of each target (0..1]",
    "interval_s": "seconds between decisions (one observation window)",
    "scrape_s": "seconds between /metrics scrapes inside a window",
    "min_decode": "fewest decode workers", "max_decode": "most decode workers",
    "min_prefill": "fewest prefill workers (0 with max 0 = aggregated serving)", "max_prefill": "most prefill workers",
    "budget": "workers x worker_cost may not exceed this (0 = this machine's cores, or GPUs with --device cuda)",
    "worker_cost": "budget units one worker takes (cores or GPUs)",
    "up_cooldown_s": "no growing a pool for this long after its last change completed",
    "down_cooldown_s": "no shrinking a pool for this long after any change to it",
    "down_windows": "windows in a row that must agree before a pool shrinks",
    "down_margin": "shrink only while the pool's latencies are below this fraction of target x headroom",
    "profile": "profile JSON from `python -m planner.profile` (required by --mode sla)",
    "forecast": "sla mode's predictor of rate and lengths: constant (last window) or trend (linear over forecast_windows)",
    "forecast_windows": "windows the trend predictor fits",
    "connector": "triton (model-control API), advisory (log decisions only) or kubernetes",
    "url": "Triton HTTP endpoint (model control)",
    "metrics_url": "Triton /metrics endpoint",
    "admin_key_file": "file holding the model-repository key (else env TRIDENT_PLANNER_ADMIN_KEY)",
    "model_repository": "where the pools' template models are ('' = this checkout's model_repository/)",
    "run_dir": "the server's private run directory where drain markers go ('' = env TRIDENT_KV_EVENTS_DIR, else found)",
    "drain_timeout_s": "longest wait for a draining worker's requests before it is unloaded anyway",
    "load_timeout_s": "longest wait for a new replica to become ready",
    "device": "where new replicas run: cpu, or cuda (replica i on GPU i mod GPUs)",
    "k8s_namespace": "Kubernetes namespace of the worker workloads",
    "k8s_workloads": "pool=kind/name pairs, e.g. decode=statefulset/trident-decode,prefill=statefulset/trident-prefill",
    "log_level": "debug, info, warning, error",
    "exporter_host": "address of the planner's own /metrics (planner.exporter)",
    "exporter_port": "port of the planner's own /metrics (0 = not served)",
}


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    mode: str = "load"
    ttft_target_ms: float = 1000.0
    itl_target_ms: float = 100.0
    headroom: float = 0.8
    interval_s: float = 5.0
    scrape_s: float = 1.0
    min_decode: int = 1
    max_decode: int = 4
    min_prefill: int = 0
    max_prefill: int = 0
    budget: float = 0.0
    worker_cost: float = 1.0
    up_cooldown_s: float = 10.0
    down_cooldown_s: float = 30.0
    down_windows: int = 3
    down_margin: float = 0.6
    profile: str = ""
    forecast: str = "trend"
    forecast_windows: int = 6
    connector: str = "triton"
    url: str = "http://127.0.0.1:8000"
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    admin_key_file: str = ""
    model_repository: str = ""
    run_dir: str = ""
    drain_timeout_s: float = 300.0
    load_timeout_s: float = 600.0
    device: str = "cpu"
    k8s_namespace: str = "default"
    k8s_workloads: str = ""
    log_level: str = "info"
    exporter_host: str = "127.0.0.1"
    exporter_port: int = 0

    def validate(self) -> PlannerConfig:
        _one_of("mode", self.mode, MODES)
        _one_of("connector", self.connector, CONNECTORS)
        _one_of("forecast", self.forecast, FORECASTS)
        _one_of("device", self.device, ("cpu", "cuda"))
        _one_of("log_level", self.log_level, ("debug", "info", "warning", "error"))
        for name in ("ttft_target_ms", "itl_target_ms", "interval_s", "scrape_s", "worker_cost",
                     "drain_timeout_s", "load_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("headroom", "down_margin"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("up_cooldown_s", "down_cooldown_s", "budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_decode <= self.max_decode:
            raise ConfigError(f"need 1 <= min_decode <= max_decode, got {self.min_decode}, {self.max_decode}")
        if not 0 <= self.min_prefill <= self.max_prefill:
            raise ConfigError(f"need 0 <= min_prefill <= max_prefill, got {self.min_prefill}, {self.max_prefill}")
        if not 0 <= self.exporter_port <= 65535:
            raise ConfigError(f"exporter_port must be in 0..65535, got {self.exporter_port}")
        if self.down_windows < 1:
            raise ConfigError(f"down_windows must be >= 1, got {self.down_windows}")
        if self.forecast_windows < 2:
            raise ConfigError(f"forecast_windows must be >= 2, got {self.forecast_windows}")
        if self.scrape_s > self.interval_s:
            raise ConfigError(f"scrape_s ({self.scrape_s}) must not exceed interval_s ({self.interval_s})")
        if self.mode == "sla" and not self.profile:
            raise ConfigError("mode sla needs --profile (write one with `python -m planner.profile`)")
        if self.connector == "kubernetes" and not self.k8s_workloads:
            raise ConfigError("connector kubernetes needs --k8s-workloads (e.g. decode=statefulset/trident-decode)")
        return self

    @property
    def pools(self) -> tuple[str, ...]:
        """The pools the planner sizes: decode, plus prefill when it may have workers."""
        return ("decode", "prefill") if self.max_prefill > 0 else ("decode",)

    def bounds(self, pool: str) -> tuple[int, int]:
        return (self.min_decode, self.max_decode) if pool == "decode" else (self.min_prefill, self.max_prefill)

    def budget_units(self, gpus: int = 0) -> float:
        """The worker budget: as configured, else this machine's cores (GPUs on cuda)."""
        if self.budget > 0:
            return self.budget
        return float(gpus if self.device == "cuda" and gpus > 0 else (os.cpu_count() or 1))

    def admin_key(self, env: Mapping[str, str] | None = None) -> str:
        """The model-repository key: `admin_key_file`, else the environment, else ''."""
        env = os.environ if env is None else env
        if self.admin_key_file:
            try:
                return Path(self.admin_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(f"admin_key_file: cannot read {self.admin_key_file!r}: {exc}") from None
        return env.get(ADMIN_KEY_ENV, "").strip()


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
