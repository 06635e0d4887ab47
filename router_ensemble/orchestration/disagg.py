"""Conditional disaggregation: who prefills a prompt, and the prefill -> decode handoff.

The `Orchestrator` calls this on the request's thread once the decode worker is chosen:

1. `Disaggregator.route(request_id, decode, token_ids, cached_tokens, sampling)` decides.
   The prompt is prefilled remotely when its uncached part (`len(token_ids) - cached_tokens`,
   where `cached_tokens` is what the decode pool's selector expects the chosen decode worker
   to hold) reaches `disagg_threshold` (0 disables) and the prefill pool's selector finds a
   ready prefill worker with fewer than `prefill_max_inflight` prefills in flight from this
   router instance (Dynamo's "prefill queue not full" condition). Inside Triton that selector
   is KV-aware, with the same cost as the decode pool's (prefill workers publish KV events
   too), so a prompt goes to the prefill worker that holds most of it at the least load.
   Otherwise the decode worker prefills locally, as in aggregated serving.
2. `Route.chunks(client, request)` streams the request's `TokenChunk`s:
   - local: the decode worker's chunks, unchanged;
   - remote: a `hold_kv` request with `max_tokens=1` to the prefill worker returns the first
     token and a KV descriptor. The token is yielded at once, so the client sees it before
     the decode worker starts; then the decode worker gets the descriptor and the token
     (`kv_descriptor`, `first_token`; `max_tokens` counts the first token), pulls the KV and
     streams the rest. `cached_tokens` reported to the client is the prefill worker's;
   - `max_tokens == 1`: the prefill worker answers alone (no lease, no decode worker).
3. Failures. A prefill worker that went away between selection and the call (the call
   fails and the pool no longer finds it ready: `WorkerSelector.is_gone`) -> the decode
   worker prefills locally, as when no prefill worker is ready at all. Any other prefill
   failure raises `EngineError` naming the prefill worker; no lease exists then. A decode
   failure after a successful prefill names both workers: `WorkerUnavailable` when the
   decode worker is lost, `KvHandoffLost` when it failed before its first token (the
   orchestrator migrates both), else `EngineError`. The decode worker releases
   the lease after its pull, and a lease nobody pulls expires after the prefill worker's
   `lease_ttl_s` (so a decode worker that dies mid-handoff strands no prefill blocks). A
   request that a stop string or a cancel ends at its first token sends the prefill worker an
   abort, which revokes its lease at once; after EOS or a stop id as the first token the
   prefill engine takes no lease at all.
4. `Route.close()` (the orchestrator's `finally`; idempotent) returns the prefill slot: the
   in-flight count and the prefill selector's pending load for the request.

Threads: a `Disaggregator` is shared by all request threads (a lock guards the in-flight
counts); a `Route` belongs to one request thread. Neither owns KV blocks: the prefill engine
owns the leased blocks until it frees them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from router_ensemble.orchestration.ports import ChunkStream, WorkerClient, WorkerSelector
from trident.core.errors import (
    ConfigError,
    EngineError,
    KvHandoffLost,
    TridentError,
    WorkerUnavailable,
)
from trident.core.settings import load_settings
from trident.core.types import FINISH_LENGTH, GenerateRequest, SamplingParams, TokenChunk

logger = logging.getLogger(__name__)

ENV_PREFIX = "TRIDENT_ROUTER_"


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    """Disaggregation settings of the router model.

    Keys are the same in the router's config.pbtxt parameters and in environment variables
    (`TRIDENT_ROUTER_` + upper-case key, which win); "" and "${...}" count as unset.
    """

    disagg_threshold: int = 256  # remote prefill from this many uncached prompt tokens; 0: never
    prefill_pool: str = "prefill"  # prefill workers are <pool>, <pool>_1, ...
    prefill_models: str = ""  # fixed comma-separated list instead of discovery
    prefill_max_inflight: int = 4  # per prefill worker and router instance; beyond: saturated

    def validate(self) -> DisaggConfig:
        if self.disagg_threshold < 0:
            raise ConfigError(f"disagg_threshold must be >= 0 (0 disables), got {self.disagg_threshold}")
        if self.prefill_max_inflight <= 0:
            raise ConfigError(f"prefill_max_inflight must be positive, got {self.prefill_max_inflight}")
        if not self.prefill_pool:
            raise ConfigError("prefill_pool must not be empty")
        return self

    @property
    def fixed_models(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.prefill_models.split(",") if m.strip())

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> DisaggConfig:
        return load_settings(cls, params, env, ENV_PREFIX)


class Disaggregator:
    """Decides local vs remote prefill per request; counts this router's prefills in flight.

    `prefill` selects among the prefill pool's workers. `client`, when given, makes the
    prefill calls instead of the orchestrator's client (inside Triton: BLS watched with the
    prefill pool's notion of a worker that went away).
    """

    def __init__(self, config: DisaggConfig, prefill: WorkerSelector, client: WorkerClient | None = None) -> None:
        self.config = config.validate()
        self.prefill = prefill
        self.client = client
        self.counts = InflightCounts()
        self._select_lock = threading.Lock()
        self._announced = False

    def route(
        self, request_id: str, decode: str, token_ids: Sequence[int], cached_tokens: int, sampling: SamplingParams
    ) -> Route:
        """The route of one request; remote prefill only when it pays off and a worker is free."""
        if not self._announced:
            # Logged at the first request, not at start: inside Triton, logging from
            # `initialize` while another thread probes models has crashed tritonserver 2.51.
            self._announced = True
            logger.info("disaggregation: %s", self.describe())
        threshold = self.config.disagg_threshold
        uncached = max(0, len(token_ids) - cached_tokens)
        if threshold <= 0 or uncached < threshold:
            return Route(decode)
        with self._select_lock:  # the check and the claim together: the limit holds under load
            saturated = self.counts.at_least(self.config.prefill_max_inflight)
            try:
                selection = self.prefill.select(request_id, token_ids, exclude=saturated)
            except WorkerUnavailable as exc:
                logger.debug("request_id=%s: %d uncached tokens but %s; prefilling on %s", request_id, uncached, exc, decode)
                return Route(decode)
            slot = PrefillSlot(self, selection.worker, request_id)
        return Route(decode, slot, prefill_only=sampling.max_tokens == 1)

    def describe(self) -> str:
        c = self.config
        when = f"prompts with >= {c.disagg_threshold} uncached tokens" if c.disagg_threshold else "off"
        pool = ", ".join(c.fixed_models) or f"{c.prefill_pool}*"
        return f"{when} (prefill pool {pool}, at most {c.prefill_max_inflight} prefills in flight per worker)"

    def inflight(self) -> dict[str, int]:
        return self.counts.snapshot()


class InflightCounts:
    """This router's prefills in flight per prefill worker. Thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, worker: str, delta: int) -> None:
        with self._lock:
            self._counts[worker] = max(0, self._counts.get(worker, 0) + delta)

    def at_least(self, limit: int) -> set[str]:
        with self._lock:
            return {w for w, n in self._counts.items() if n >= limit}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {w: n for w, n in self._counts.items() if n}


class PrefillSlot:
    """One request's claim on a prefill worker: an in-flight count and the prefill selector's
    pending load. Taken by `Disaggregator.route`, given back once by `release` (idempotent)."""

    __slots__ = ("owner", "worker", "request_id", "_held")

    def __init__(self, owner: Disaggregator, worker: str, request_id: str) -> None:
        self.owner = owner
        self.worker = worker
        self.request_id = request_id
        self._held = True
        owner.counts.add(worker, +1)

    def release(self) -> None:
        if self._held:
            self._held = False
            self.owner.counts.add(self.worker, -1)
            self.owner.prefill.release(self.request_id)


class Route:
    """Where one request's prompt is prefilled and where it is decoded; see the module docs."""

    __slots__ = ("decode", "slot", "prefill", "prefill_only")

    def __init__(self, decode: str, slot: PrefillSlot | None = None, prefill_only: bool = False) -> None:
        self.decode = decode
        self.slot = slot
        self.prefill = slot.worker if slot is not None else None
        self.prefill_only = prefill_only

    @property
    def label(self) -> str:
        """The `worker` output: "decode_1", "prefill>decode_1", or "prefill" (prefill only)."""
        if self.prefill is None:
            return self.decode
        return self.prefill if self.prefill_only else f"{self.prefill}>{self.decode}"

    def chunks(self, client: WorkerClient, request: GenerateRequest) -> ChunkStream:
        if self.slot is None or self.prefill is None:
            return client.generate(self.decode, request)
        prefill_client = self.slot.owner.client or client
        if self.prefill_only:
            return self._prefill_only(prefill_client, client, self.prefill, request)
        return self._disaggregated(prefill_client, client, self.prefill, request)

    def close(self) -> None:
        """Give the prefill slot back. Idempotent."""
        if self.slot is not None:
            self.slot.release()

    def record_served(self, decode_pool: WorkerSelector, prompt_tokens: int, cached_tokens: int) -> None:
        """Report the served cache hit to the pool whose worker prefilled the prompt."""
        if self.slot is not None and self.prefill is not None:
            self.slot.owner.prefill.record_served(self.prefill, prompt_tokens, cached_tokens)
        else:
            decode_pool.record_served(self.decode, prompt_tokens, cached_tokens)

    # -- the flows ----------------------------------------------------------------------
    def _prefill_only(
        self, prefill_client: WorkerClient, client: WorkerClient, prefill: str, request: GenerateRequest
    ) -> ChunkStream:
        started = False
        try:
            for chunk in prefill_client.generate(prefill, request):
                started = True
                yield chunk
        except TridentError as exc:
            if started or not self._gone(prefill, exc):
                raise
            self.prefill = None
            yield from client.generate(self.decode, request)
        finally:
            self.close()

    def _disaggregated(
        self, prefill_client: WorkerClient, client: WorkerClient, prefill: str, request: GenerateRequest
    ) -> ChunkStream:
        try:
            final, tokens = self._run_prefill(prefill_client, prefill, request)
        except TridentError as exc:
            if not self._gone(prefill, exc):
                raise
            self.prefill = None
            yield from client.generate(self.decode, request)
            return
        finally:
            self.close()
        if final.finish_reason != FINISH_LENGTH:
            # EOS / a stop token as the first token (no lease was taken), or an abort: the
            # request ends here.
            yield replace(final, output_ids=tokens)
            return
        first = TokenChunk(
            request.request_id, tokens, False, None, final.num_input_tokens, final.cached_tokens,
            logprobs=final.logprobs, top_logprobs=final.top_logprobs,
            prompt_logprobs=final.prompt_logprobs, prompt_top_logprobs=final.prompt_top_logprobs,
        )
        try:
            yield first  # the client gets the first token now, before decode starts
        except GeneratorExit:  # a stop string or a cancel at the first token: nobody pulls
            prefill_client.abort(prefill, request.request_id)  # the prefill worker frees the lease now
            raise
        # (the first token's logprobs and the prompt's came from the prefill worker)
        decode_request = replace(
            request, kv_descriptor=final.kv_descriptor, first_token=tokens[0],
            sampling=replace(request.sampling, prompt_logprobs=None),
        )
        decoded = False
        try:
            for chunk in client.generate(self.decode, decode_request):
                decoded = decoded or bool(chunk.output_ids)
                yield replace(chunk, cached_tokens=final.cached_tokens)
        except TridentError as exc:
            message = (
                f"decode worker {self.decode} failed after prefill on {prefill}: {exc} "
                f"(request_id={request.request_id})"
            )
            if not decoded:  # the lease may be unpulled: free it now rather than at its expiry
                prefill_client.abort(prefill, request.request_id)
            if isinstance(exc, WorkerUnavailable):
                raise type(exc)(message) from exc  # the decode worker is lost: the orchestrator migrates
            if not decoded:
                raise KvHandoffLost(message) from exc
            raise EngineError(message) from exc

    def _gone(self, prefill: str, exc: TridentError) -> bool:
        """Whether a failed prefill call means the worker went away (then: prefill locally).

        Triton answers a call to an unloaded model with an ordinary error response, so the
        pool is re-checked after any failure; a worker that is still ready failed for real.
        """
        self.close()
        assert self.slot is not None
        gone = self.slot.owner.prefill.is_gone(prefill) or isinstance(exc, WorkerUnavailable)
        if gone:
            logger.warning("prefill worker %s is gone (%s); prefilling on %s", prefill, exc, self.decode)
        return gone

    def _run_prefill(
        self, client: WorkerClient, prefill: str, request: GenerateRequest
    ) -> tuple[TokenChunk, tuple[int, ...]]:
        """The prefill worker's final chunk and the token(s) it sampled."""
        sp = request.sampling
        prefill_request = replace(
            request, sampling=replace(sp, max_tokens=1, min_tokens=min(sp.min_tokens, 1)), hold_kv=True
        )
        tokens: list[int] = []
        logprobs: dict[str, tuple] = {"logprobs": (), "top_logprobs": (), "prompt_logprobs": (), "prompt_top_logprobs": ()}
        final: TokenChunk | None = None
        try:
            for chunk in client.generate(prefill, prefill_request):
                tokens.extend(chunk.output_ids)
                for name in logprobs:
                    logprobs[name] += getattr(chunk, name)
                if chunk.finished:
                    final = replace(chunk, **logprobs)
        except WorkerUnavailable:
            raise
        except TridentError as exc:
            raise EngineError(f"prefill worker {prefill} failed: {exc}") from exc
        if final is None:
            raise EngineError(f"prefill worker {prefill} ended request {request.request_id} without a final response")
        if final.finish_reason == FINISH_LENGTH:
            if len(tokens) != 1:
                raise EngineError(f"prefill worker {prefill} returned {len(tokens)} tokens, expected 1")
            if not final.kv_descriptor:
                raise EngineError(
                    f"prefill worker {prefill} returned no KV descriptor; start it with shareable_kv=true"
                )
        return final, tuple(tokens)
