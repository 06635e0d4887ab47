"""The ports the orchestration talks through, declared with every method it uses.

The orchestration (`orchestrator`, `disagg`) is pure: it reaches workers through a
`WorkerClient` and picks them through a `WorkerSelector`. Inside Triton the router model's
edge (`router_ensemble.triton`) provides both: BLS calls watched for workers that vanish,
and KV-aware selection per pool (`kv_routing.PoolRouting`). Tests and in-process tools use
`local_client.EngineWorkerClient` and `routing.directory.RoundRobinSelector`.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

from trident.core.types import GenerateRequest, TokenChunk

ChunkStream = Generator[TokenChunk, None, None]


class WorkerClient(Protocol):
    """How the orchestration reaches a worker model. Any request thread; stateless.

    `generate` yields the worker's chunks until the finished one; a worker error raises a
    `TridentError` whose message is the worker's (`WorkerUnavailable` when the worker is
    gone). Closing the stream before the finished chunk aborts the request on the worker
    and returns once the worker has ended it (its blocks are free). `abort` asks a worker to
    abort a request at once (no-op when it already finished).
    """

    def generate(self, worker: str, request: GenerateRequest) -> ChunkStream: ...

    def abort(self, worker: str, request_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Selection:
    """A worker for one request, and the prompt tokens it is expected to hold cached
    (0 when the selector does not know)."""

    worker: str
    cached_tokens: int = 0


class WorkerSelector(Protocol):
    """Picks a worker of one pool per request. Any request thread.

    `select` raises `WorkerUnavailable` when no ready worker outside `exclude` is left;
    `release` is called exactly once per successful `select` when the request ends;
    `record_served` reports what the worker actually served from its cache (hit rates);
    `is_gone` re-checks, after a failed call, whether the worker is still ready.
    """

    def select(self, request_id: str, token_ids: Sequence[int], exclude: Collection[str] = ()) -> Selection: ...

    def release(self, request_id: str) -> None: ...

    def record_served(self, worker: str, prompt_tokens: int, cached_tokens: int) -> None: ...

    def is_gone(self, worker: str) -> bool: ...
