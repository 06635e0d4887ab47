"""One error hierarchy for the whole project.

Request errors carry the name of the bad field so that the router model can turn them
into a Triton error and the OpenAI frontend into an HTTP 400 whose body names `param`.
"""

from __future__ import annotations


class TridentError(Exception):
    """Base class of every error Trident raises on purpose."""


class ValidationError(TridentError, ValueError):
    """A request field is missing, has the wrong type or an invalid value.

    `field` names the offending input (`max_tokens`, `temperature`, `messages`, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextLengthError(ValidationError):
    """The prompt (plus the requested new tokens) does not fit the model's context."""


class ModelLoadError(TridentError):
    """A model file is missing, corrupt or of an unsupported architecture."""


class EngineError(TridentError):
    """The engine failed while running a request (not the request's fault)."""


class KVTransferError(TridentError):
    """A KV handoff failed: unknown or expired lease, layout mismatch, unreachable pool."""


class WorkerUnavailable(TridentError):
    """No worker can take the request (none ready, or the chosen one went away)."""


class WorkerUnreachable(WorkerUnavailable):
    """The request never reached the chosen worker (its node could not be reached): another
    worker may take it."""


class ConfigError(TridentError, ValueError):
    """A configuration value (config.pbtxt parameter, CLI flag, env var) is invalid."""


class WorkerAborted(WorkerUnavailable):
    """The worker ended a request on its own before it finished: it is shutting down
    (unloaded, or drained past its timeout). Another worker may continue it."""


class KvHandoffLost(WorkerUnavailable):
    """The decode worker failed before its first token after a remote prefill (the prefill
    worker's KV could not be pulled): a decode worker may recompute the prompt."""
