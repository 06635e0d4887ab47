"""Configuration of KV-aware routing: one dataclass, one path.

Keys are the same in the router model's config.pbtxt parameters and in environment variables
(`TRIDENT_ROUTER_` + upper-case key, which win). "" and unexpanded "${...}" count as unset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from router_ensemble.routing.policies import POLICIES
from trident.core.errors import ConfigError
from trident.core.settings import load_settings

ENV_PREFIX = "TRIDENT_ROUTER_"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """KV-aware routing settings, read once by the router model at start (`from_mapping`)."""

    policy: str = "kv"  # kv | round_robin | random | least_loaded
    overlap_weight: float = 1.0  # Dynamo's kv-overlap-score-weight
    # a cached block held only in a worker's host memory / only on its disk tier counts this
    # much of a device hit (the best tier holding a block decides; Dynamo's defaults)
    host_tier_weight: float = 0.75
    disk_tier_weight: float = 0.25
    temperature: float = 0.0  # 0: argmin of the cost; > 0: softmax sampling
    seed: int = -1  # RNG seed for sampling and ties; -1: unseeded
    block_size: int = 16  # must equal the workers' engine block size
    kv_events: bool = True  # False: approximate mode (assume the chosen worker cached the prompt)
    approx_ttl_s: float = 120.0  # approximate mode: how long an assumed block stays
    worker_timeout_s: float = 3.0  # drop a worker that sent no load report for this long
    resync_timeout_s: float = 2.0  # give up waiting for a snapshot/replay after this long
    pending_grace_s: float = 0.1  # a load report this much newer than an assignment covers it
    pending_max_age_s: float = 5.0  # forget pending assignments after this long regardless

    def validate(self) -> RoutingConfig:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"policy: unknown routing policy {self.policy!r}; expected one of {', '.join(POLICIES)}"
            )
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.seed < -1:
            raise ConfigError(f"seed must be >= 0 (or -1 for none), got {self.seed}")
        for name in ("overlap_weight", "temperature", "pending_grace_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        for name in ("host_tier_weight", "disk_tier_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise ConfigError(
                    f"{name} must be between 0 and 1 (a device hit counts 1), got {value}"
                )
        for name in ("approx_ttl_s", "worker_timeout_s", "resync_timeout_s", "pending_max_age_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        return self

    @property
    def rng_seed(self) -> int | None:
        return None if self.seed < 0 else self.seed

    @classmethod
    def from_mapping(
        cls, params: Mapping[str, str], env: Mapping[str, str] | None = None
    ) -> RoutingConfig:
        return load_settings(cls, params, env, ENV_PREFIX)
