"""Routing policies: pick one worker among candidates.

`kv` (the default) is Dynamo's KV-aware cost, lower is better:

    cost(w) = overlap_weight * prefill_blocks(w) + decode_blocks(w)
    prefill_blocks(w) = new_blocks(w) + prefill backlog of w
    decode_blocks(w)  = active blocks of w (last load report + the router's pending assignments)
                        + new_blocks(w)
    new_blocks(w)     = request_blocks - overlap_blocks(w)

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


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker as a policy sees it for one request."""

    worker_id: str
    overlap_blocks: int
    load: WorkerLoad


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
        new_blocks = request_blocks - candidate.overlap_blocks
        prefill = new_blocks + load.prefill_blocks
        return self.overlap_weight * prefill + load.active_blocks + new_blocks

    def select(self, candidates: Sequence[Candidate], request_blocks: int) -> Candidate:
        costs = [self.cost(c, request_blocks) for c in candidates]
        low, high = min(costs), max(costs)
        if self.temperature <= 0 or high == low:
            best = [c for c, cost in zip(candidates, costs, strict=True) if cost == low]
            return best[0] if len(best) == 1 else self._rng.choice(best)
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
