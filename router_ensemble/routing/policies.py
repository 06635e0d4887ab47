"""Routing policies: pick one worker among candidates.

`kv` (the default) is Dynamo's KV-aware cost, lower is better:

    cost(w) = overlap_weight * prefill_blocks(w) + decode_blocks(w)
    prefill_blocks(w) = new_blocks(w) + prefill backlog of w
    decode_blocks(w)  = active blocks of w (last load report + the router's pending assignments)
                        + new_blocks(w)
    new_blocks(w)     = request_blocks - hit_blocks(w)
    hit_blocks(w)     = the leading prompt blocks w holds, each weighed by the best tier
                        holding it: 1 in the device pool, host_tier_weight (0.75) in host
                        memory only, disk_tier_weight (0.25) on disk only

A lower-tier hit still has to be brought back to the device (from disk, read first), so it
saves less than a device hit: all else equal, a worker holding the prefix in its device pool
beats one holding it in host memory, which beats one holding it on disk. The weighed hit
enters both terms, so a block held only in host memory counts exactly `host_tier_weight` of a
device hit in the cost.

As in Dynamo, the decode term is the worker's *potential* active blocks: what it holds now plus
the blocks this request would add there. Blocks a worker already caches are shared, not added,
so a cache hit saves twice: less prefill and less new KV memory. Without the second term a
worker running one request of a shared-prefix group (its active blocks include the whole
prefix) looks busier than an idle worker by more than the hit saves, and the group scatters.

`overlap_weight` trades prefill work saved by a cache hit against decode load (Dynamo's
default 1.0; higher favours cache hits, lower favours balance). At `temperature == 0` the
lowest cost wins (ties broken by the seeded RNG so idle workers share the load); above 0 the
worker is sampled from softmax(-normalised_cost / temperature), where costs are first scaled to
[0, 1] so the temperature means the same at every load.

`round_robin`, `random` and `least_loaded` ignore the cache; they exist for comparison.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from router_ensemble.routing.load import WorkerLoad
from trident.core.errors import ConfigError


@dataclass(slots=True)
class Candidate:
    """One worker as a policy sees it for one request (read-only by convention: not frozen
    because `decide` builds one per worker per request, and a frozen dataclass costs three
    times as much to build)."""

    worker_id: str
    overlap_blocks: int  # leading prompt blocks it holds, in any tier
    load: WorkerLoad
    weighted_overlap: float | None = None  # those blocks weighed by tier; None: all on device

    @property
    def hit_blocks(self) -> float:
        """The overlap the cost counts (`weighted_overlap`, else `overlap_blocks`)."""
        return self.overlap_blocks if self.weighted_overlap is None else self.weighted_overlap


class Policy(ABC):
    """Chooses a worker. Called by `KvRouter.decide` under the router's scheduling lock, so
    implementations may keep unsynchronised state (counters, RNG)."""

    name = ""

    @abstractmethod
    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        """`candidates` is non-empty and in a stable order."""


class KvPolicy(Policy):
    """Dynamo's KV-aware cost (see the module docstring); the default policy."""

    name = "kv"

    def __init__(
        self, overlap_weight: float = 1.0, temperature: float = 0.0, seed: int | None = None
    ) -> None:
        if not math.isfinite(overlap_weight) or overlap_weight < 0:
            raise ConfigError(f"overlap_weight must be >= 0, got {overlap_weight}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self._rng = random.Random(seed)

    def cost(self, candidate: Candidate, request_blocks: int) -> float:
        load = candidate.load
        new_blocks = request_blocks - candidate.hit_blocks
        prefill = new_blocks + load.prefill_blocks
        return self.overlap_weight * prefill + load.active_blocks + new_blocks

    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        # `cost` inlined (same arithmetic, same order): this runs on every request
        weight = self.overlap_weight
        costs = []
        for c in candidates:
            load = c.load
            new_blocks = request_blocks - (
                c.overlap_blocks if c.weighted_overlap is None else c.weighted_overlap
            )
            costs.append(
                weight * (new_blocks + load.prefill_blocks) + load.active_blocks + new_blocks
            )
        low = min(costs)
        if self.temperature <= 0:
            if costs.count(low) == 1:
                return candidates[costs.index(low)]
            return self._rng.choice([c for c, v in zip(candidates, costs, strict=True) if v == low])
        high = max(costs)
        if high == low:
            return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)
        span = high - low
        weights = [math.exp(-(cost - low) / span / self.temperature) for cost in costs]
        return self._rng.choices(candidates, weights=weights, k=1)[0]


class RoundRobin(Policy):
    """Each candidate in turn, ignoring cache and load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


class RandomPolicy(Policy):
    """A uniformly random candidate (seeded RNG)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        return self._rng.choice(candidates)


class LeastLoaded(Policy):
    """Fewest active plus backlog blocks, then fewest waiting requests; ties rotate."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        keys = [(c.load.active_blocks + c.load.prefill_blocks, c.load.waiting) for c in candidates]
        low = min(keys)
        best = [c for c, key in zip(candidates, keys, strict=True) if key == low]
        choice = best[self._next % len(best)]
        self._next += 1
        return choice


POLICIES = ("kv", "round_robin", "random", "least_loaded")


def make_policy(
    name: str, *, overlap_weight: float = 1.0, temperature: float = 0.0, seed: int | None = None
) -> Policy:
    """Build a policy by its config name; ConfigError names the valid ones."""
    if name == "kv":
        return KvPolicy(overlap_weight, temperature, seed)
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomPolicy(seed)
    if name == "least_loaded":
        return LeastLoaded()
    raise ConfigError(
        f"policy: unknown routing policy {name!r}; expected one of {', '.join(POLICIES)}"
    )
