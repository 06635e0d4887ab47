"""Predictive sizing against a profile (`--mode sla`), after Dynamo's SLA planner.

Each window: forecast the next window's request rate λ, input length and output length
(`forecast`); the prefix hit rate discounts the input (cached tokens are not prefilled).
Then, with the profile of one worker (`profile.Profile`):

- prefill work: λ x effective input tokens/s against one worker's prefill throughput at that
  length. A worker busy a fraction ρ of the time queues a request for about ttft/(1-ρ), so
  it may be loaded up to ρ_max = 1 - ttft(isl) / TTFT target;
- decode work: λ x output tokens/s against one worker's output throughput at the most
  concurrent requests whose ITL meets the target, at context = input + output/2.

Disaggregated, the prefill pool gets ceil(prefill work / ρ_max) and the decode pool
ceil(decode work). Aggregated, the decode pool does both: ceil(prefill share + decode
share), and at least what the TTFT queueing bound needs.

Correction factors (observed / profile-predicted latency at the current load, smoothed)
scale the profile to what the live service shows, as Dynamo does: a slower machine than the
profiled one asks for more workers. Pure: all inputs are arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.core.forecast import predict
from planner.core.observation import Window
from planner.core.profile import Profile
from planner.core.signals import ITL, TTFT, target_s
from planner.core.state import PoolProposal

CORRECTION_RANGE = (0.5, 4.0)
CORRECTION_SMOOTHING = 0.5  # weight of the newest window




@dataclass(frozen=True, slots=True)
class Demand:
    """The forecast for the next window."""

    rate: float  # requests/s
    input_tokens: float
    output_tokens: float
    hit_rate: float

    @property
    def effective_input(self) -> float:
        """Prompt tokens a worker actually prefills per request."""
        return max(self.input_tokens * (1.0 - self.hit_rate), 1.0)

    @property
    def context(self) -> float:
        """Mean context of a decoding request."""
        return max(self.input_tokens + self.output_tokens / 2, 1.0)


def forecast(history: Sequence[tuple[float, float, float, float]], kind: str) -> Demand:
    """Demand from the (rate, isl, osl, hit) of recent windows; lengths of idle windows (0)
    are skipped so that a quiet spell does not forget what requests look like."""
    rate = predict([h[0] for h in history], kind)
    lengths = [h for h in history if h[1] > 0]
    if not lengths:
        return Demand(rate, 1.0, 1.0, 0.0)
    return Demand(
        rate,
        predict([h[1] for h in lengths], kind),
        max(predict([h[2] for h in lengths], kind), 1.0),
        min(max(predict([h[3] for h in lengths], "constant"), 0.0), 0.95),
    )


def corrections(
    window: Window,
    replicas: Mapping[str, int],
    profile: Profile,
    config: PlannerConfig,
    previous: Mapping[str, float],
) -> dict[str, float]:
    """Observed / profile-predicted TTFT and ITL at the window's load, smoothed."""
    out = {TTFT: previous.get(TTFT, 1.0), ITL: previous.get(ITL, 1.0)}
    demand = Demand(window.request_rate, window.input_tokens, window.output_tokens, window.prefix_hit_rate)
    if window.input_tokens <= 0:
        return out
    decode = window.pool("decode")
    ttft_pool = window.pool("prefill") if "prefill" in config.pools else decode
    n = max(replicas.get("prefill" if "prefill" in config.pools else "decode", 0), 1)
    if ttft_pool.ttft_s is not None:
        ttft0 = profile.ttft(demand.effective_input)
        busy = min(demand.rate * ttft0 / n, 0.9)
        out[TTFT] = _smooth(out[TTFT], ttft_pool.ttft_s / (ttft0 / (1 - busy)))
    running = decode.mean("running")
    if decode.itl_s is not None and running >= 0.5:
        out[ITL] = _smooth(out[ITL], decode.itl_s / profile.itl(running, demand.context))
    return out


def propose_all(
    config: PlannerConfig,
    profile: Profile,
    demand: Demand,
    corr: Mapping[str, float],
) -> dict[str, PoolProposal]:
    """Workers each pool needs for `demand`, with the latency expected at that size."""
    ttft_target, itl_target = target_s(TTFT, config), target_s(ITL, config)
    ttft0 = profile.ttft(demand.effective_input) * corr.get(TTFT, 1.0)
    prefill_share = demand.rate * ttft0  # worker-seconds of prefill per second
    rho_max = 1.0 - ttft0 / ttft_target
    itl_eff = itl_target / corr.get(ITL, 1.0)
    # the profile's throughput at that concurrency, slowed down by the same correction
    capacity = profile.decode_capacity(itl_eff, demand.context) / corr.get(ITL, 1.0)
    decode_share = demand.rate * demand.output_tokens / capacity if capacity > 0 else math.inf
    problems = []
    if rho_max <= 0.05:
        problems.append(f"TTFT target below the profile's {ttft0 * 1e3:.0f} ms at {demand.effective_input:.0f} tokens")
        rho_max = 0.05
    if capacity <= 0:
        problems.append(f"ITL target below the profile's single-request ITL at context {demand.context:.0f}")
    why = "; ".join(problems)
    if "prefill" in config.pools:
        n_p = _ceil(prefill_share / rho_max)
        n_d = _ceil(decode_share) if capacity > 0 else config.max_decode
        ttft = ttft0 / (1 - min(prefill_share / max(n_p, 1), 0.99))
        return {
            "prefill": PoolProposal(n_p, why or f"{prefill_share:.2f} worker-s/s of prefill at ρ<={rho_max:.2f}", ttft, None),
            "decode": PoolProposal(n_d, why or f"{decode_share:.2f} workers of decode", None,
                                   _itl_at(profile, demand, max(n_d, 1), corr)),
        }
    n = config.max_decode if capacity <= 0 else _ceil(max(prefill_share + decode_share, prefill_share / rho_max))
    busy = min((prefill_share + (decode_share if capacity > 0 else 0.0)) / max(n, 1), 0.99)
    reason = why or f"{prefill_share:.2f} prefill + {decode_share:.2f} decode worker-s/s at {demand.rate:.2f} req/s"
    return {"decode": PoolProposal(n, reason, ttft0 / (1 - busy), _itl_at(profile, demand, max(n, 1), corr))}


def _itl_at(profile: Profile, demand: Demand, workers: int, corr: Mapping[str, float]) -> float:
    """ITL when the forecast's decoding requests spread over `workers` (Little's law:
    concurrency = rate x output tokens x ITL, solved by iteration)."""
    itl = profile.itl(1.0, demand.context)
    for _ in range(20):
        concurrency = demand.rate * demand.output_tokens * itl / workers
        itl = profile.itl(max(concurrency, 1.0), demand.context) * corr.get(ITL, 1.0)
    return itl


def _ceil(x: float) -> int:
    return max(int(math.ceil(x - 1e-9)), 0)


def _smooth(old: float, ratio: float) -> float:
    lo, hi = CORRECTION_RANGE
    return min(max((1 - CORRECTION_SMOOTHING) * old + CORRECTION_SMOOTHING * ratio, lo), hi)
