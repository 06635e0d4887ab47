"""Helpers shared by the Python-backend models (`model_repository/*/1/model.py`).

Everything that touches `triton_python_backend_utils` imports it lazily, so this module
imports anywhere (tests, CLI) and only the functions that need Triton fail outside a stub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from trident.core.settings import is_unset

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def pb_utils() -> Any:
    """The `triton_python_backend_utils` module (only importable inside a stub)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """String parameters of a model config (dict form), without the unset ones."""
    out: dict[str, str] = {}
    for key, entry in (model_config.get("parameters") or {}).items():
        value = entry.get("string_value") if isinstance(entry, Mapping) else entry
        if not is_unset(value):
            out[key] = str(value)
    return out


def instance_device(args: Mapping[str, str]) -> str | None:
    """`cuda:N` for a KIND_GPU instance (from `model_instance_device_id`), else None."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}"


class PbLoggerHandler(logging.Handler):
    """Forwards `logging` records to Triton's log through `pb_utils.Logger`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"[{self.prefix}] {self.format(record)}"
            log = pb_utils().Logger
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


def setup_logging(model_name: str) -> None:
    """Route this stub's `logging` to Triton's log at `TRIDENT_LOG_LEVEL` (default info)."""
    root = logging.getLogger()
    if not any(isinstance(h, PbLoggerHandler) for h in root.handlers):
        root.addHandler(PbLoggerHandler(model_name))
    root.setLevel(_LEVELS.get(os.environ.get("TRIDENT_LOG_LEVEL", "info").lower(), logging.INFO))


def read_inputs(request: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The inputs among `names` that the request carries, as numpy arrays."""
    pb = pb_utils()
    out: dict[str, np.ndarray] = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def string_array(values: Iterable[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


def tensors(arrays: Mapping[str, np.ndarray]) -> list[Any]:
    pb = pb_utils()
    return [pb.Tensor(name, array) for name, array in arrays.items()]


def error_response(exc: BaseException | str) -> Any:
    """An `InferenceResponse` carrying a `TritonError` with the exception's message."""
    pb = pb_utils()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))


def send_final_error(sender: Any, exc: BaseException | str) -> None:
    """Send an error response that also closes a decoupled request (COMPLETE_FINAL)."""
    pb = pb_utils()
    sender.send(error_response(exc), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def close_quietly(sender: Any) -> None:
    """Close a decoupled request without a response (e.g. after the client cancelled)."""
    pb = pb_utils()
    try:
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # the request may already be closed by the server
        logging.getLogger(__name__).debug("closing a cancelled request: %s", exc)

