"""Request migration: a request whose worker is lost mid-stream continues on another worker.

The `Orchestrator` calls `Migration.cause_of` when a worker call fails, and, when it names a
cause, `Migration.resumed` for the request to send next. As in Dynamo, the new worker gets
the prompt plus every token generated so far as its prompt (it re-prefills them, from its
prefix cache where it holds them), `max_tokens` and `min_tokens` less those tokens, and
`output_offset` = their number, so that seeded sampling draws by output position and a
greedy or seeded request yields exactly the tokens an undisturbed run would. The client's
stream goes on unbroken: the detokenizer and stop-string state stay with the orchestrator.

Causes (the `cause` label of `trident_router_migrations_total`):

- `unreachable`: the call never reached the worker (its node is down), before any token;
- `gone`: the worker was removed from routing while its stream was silent (its stub died,
  or it froze and its load reports stopped), or it was unloaded before it answered;
- `aborted`: the worker ended the request itself (it is shutting down: unloaded, or
  drained by the planner past its timeout);
- `kv_handoff`: after a remote prefill the decode worker failed before its first token
  (the prefill worker's KV could not be pulled): a decode worker recomputes the prompt.

A request is migrated at most `migration_limit` times, and not when its prompt plus
generated tokens exceed `migration_max_tokens` (re-prefilling them would cost more than the
request is worth): it then ends with the worker's error, saying why it was not migrated.

Threads: one `Migration` is shared by all request threads; its counts take a lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from trident.core.errors import (
    ConfigError,
    KvHandoffLost,
    TridentError,
    WorkerAborted,
    WorkerUnavailable,
    WorkerUnreachable,
)
from trident.core.settings import load_settings
from trident.core.types import GenerateRequest

ENV_PREFIX = "TRIDENT_ROUTER_"
CAUSES = ("unreachable", "gone", "aborted", "kv_handoff")


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """Migration settings of the router model (config.pbtxt parameters, or
    `TRIDENT_ROUTER_<KEY>` environment variables, which win)."""

    migration_limit: int = 3  # times one request may move to another worker; 0: never
    migration_max_tokens: int = 4096  # prompt + generated tokens beyond which it is not moved

    def validate(self) -> MigrationConfig:
        if self.migration_limit < 0:
            raise ConfigError(f"migration_limit must be >= 0 (0 disables), got {self.migration_limit}")
        if self.migration_max_tokens <= 0:
            raise ConfigError(f"migration_max_tokens must be positive, got {self.migration_max_tokens}")
        return self

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> MigrationConfig:
        return load_settings(cls, params, env, ENV_PREFIX)


class Migration:
    """Decides whether a failed call moves its request, builds the resumed request, and
    counts migrations by cause (read by the router's metrics exporter)."""

    def __init__(self, config: MigrationConfig | None = None) -> None:
        self.config = (config or MigrationConfig()).validate()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def cause_of(exc: TridentError, worker_gone: bool) -> str | None:
        """The migration cause of a failed worker call, or None when the failure is the
        request's own (a validation error, an engine failure on a worker still serving).
        `worker_gone`: the decode pool no longer finds the worker ready."""
        if isinstance(exc, WorkerUnreachable):
            return "unreachable"
        if isinstance(exc, WorkerAborted):
            return "aborted"
        if isinstance(exc, KvHandoffLost):
            return "kv_handoff"
        if isinstance(exc, WorkerUnavailable) or worker_gone:
            return "gone"
        return None

    def refusal(self, moved: int, tokens: int) -> str | None:
        """Why a request that has moved `moved` times and holds `tokens` (prompt + generated)
        may not move again; None when it may."""
        c = self.config
        if moved >= c.migration_limit:
            return f"migration_limit ({c.migration_limit}) reached" if c.migration_limit else "migration is off"
        if tokens > c.migration_max_tokens:
            return f"its {tokens} tokens exceed migration_max_tokens ({c.migration_max_tokens})"
        return None

    def record(self, cause: str) -> None:
        with self._lock:
            self._counts[cause] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def resumed(request: GenerateRequest, request_id: str, generated: tuple[int, ...]) -> GenerateRequest:
    """`request` continued after `generated` (its outputs so far, possibly from several
    workers); `request.input_ids` is the original prompt. `max_tokens` must exceed
    `len(generated)` (the caller finishes a request that has nothing left to generate)."""
    sp = request.sampling
    n = len(generated)
    sampling = replace(sp, max_tokens=sp.max_tokens - n, min_tokens=max(0, sp.min_tokens - n))
    if n:  # the prompt's logprobs came with the first token; the new prompt holds outputs
        sampling = replace(sampling, prompt_logprobs=None)
    return replace(
        request, request_id=request_id, input_ids=request.input_ids + generated, sampling=sampling,
        output_offset=n, kv_descriptor=None, first_token=None,
    )
