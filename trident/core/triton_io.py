"""Helpers every Python-backend model of ours uses: logging, inputs, responses.

Each takes the `triton_python_backend_utils` module as `pb` (the model passes in the one
its stub provides), so this module imports nothing of Triton: the edges built on it
(`router_ensemble.triton`, `plugins.triton`) run in unit tests with a small fake.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
logger = logging.getLogger(__name__)


class PbLoggerHandler(logging.Handler):
    """Forwards `logging` records to Triton's log through `pb.Logger`."""

    def __init__(self, pb: Any, prefix: str) -> None:
        super().__init__()
        self.pb = pb
        self.prefix = prefix
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"[{self.prefix}] {self.format(record)}"
            log = self.pb.Logger
            if record.levelno >= logging.ERROR:
                log.log_error(text)
            elif record.levelno >= logging.WARNING:
                log.log_warn(text)
            elif record.levelno >= logging.INFO:
                log.log_info(text)
            else:
                log.log_verbose(text)
        except Exception:  # logging must never take the model down
            self.handleError(record)


def setup_logging(pb: Any, model_name: str) -> None:
    """Route this stub's `logging` to Triton's log at `TRIDENT_LOG_LEVEL` (default info)."""
    root = logging.getLogger()
    if not any(isinstance(h, PbLoggerHandler) for h in root.handlers):
        root.addHandler(PbLoggerHandler(pb, model_name))
    root.setLevel(_LEVELS.get(os.environ.get("TRIDENT_LOG_LEVEL", "info").lower(), logging.INFO))


def read_inputs(pb: Any, request: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The inputs among `names` that the request carries, as numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def response(pb: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """An `InferenceResponse` carrying `arrays` as output tensors."""
    return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array) for name, array in arrays.items()])


def send_final_error(pb: Any, sender: Any, exc: BaseException | str) -> None:
    """Send an error response that also closes a decoupled request (COMPLETE_FINAL)."""
    error = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
    sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def close_quietly(pb: Any, sender: Any) -> None:
    """Close a decoupled request without a response (e.g. after the client cancelled)."""
    try:
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # the request may already be closed by the server
        logger.debug("closing a cancelled request: %s", exc)
