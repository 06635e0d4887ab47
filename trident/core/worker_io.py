"""Tensor I/O of the worker models (`decode`, later `prefill`) and shared input readers.

The router calls a worker over BLS with `encode_generate_inputs(request)`; the worker
rebuilds the `GenerateRequest` with `parse_generate_inputs`, and answers each engine
`TokenChunk` with `encode_chunk_outputs`, which the router turns back into a chunk with
`decode_chunk_outputs`. Pure numpy: no Triton import, so both ends are tested directly.

Worker inputs (all optional; a generation needs `input_ids`):
  input_ids INT32 [-1], request_id STRING [1], max_tokens INT32 [1], min_tokens INT32 [1],
  temperature FP32 [1], top_p FP32 [1], top_k INT32 [1], seed UINT64 [1],
  stop_token_ids INT32 [-1], ignore_eos BOOL [1],
  abort_request_id STRING [1] — abort that request instead of generating (one empty final
  response answers it).
  Disaggregation (`router_ensemble/orchestration/disagg.py`): hold_kv BOOL [1] (prefill: keep the prompt's
  KV under a lease and return its descriptor), kv_descriptor STRING [1] + first_token
  INT32 [1] (decode: pull the prompt's KV from the prefill worker and continue after the
  first token, which is not sent again; max_tokens counts it).
Worker outputs (every response): output_ids INT32 [-1], finish_reason STRING [1] ("" until
the last), num_input_tokens INT32 [1], num_output_tokens INT32 [1] (this response's),
cached_tokens INT32 [1], kv_descriptor STRING [1] (b"" except on the last response of a
hold_kv request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk

WORKER_INPUTS = (
    "input_ids", "request_id", "max_tokens", "min_tokens", "temperature", "top_p", "top_k",
    "seed", "stop_token_ids", "ignore_eos", "abort_request_id", "hold_kv", "kv_descriptor", "first_token",
)
WORKER_OUTPUTS = ("output_ids", "finish_reason", "num_input_tokens", "num_output_tokens", "cached_tokens", "kv_descriptor")

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class AbortCommand:
    """A worker request that asks to abort another request (sent by the router)."""

    request_id: str


# ---- readers for optional inputs (shared with the router's I/O) ---------------------
def one_value(arrays: Arrays, name: str) -> object | None:
    """The single element of input `name`, or None when absent."""
    if name not in arrays:
        return None
    array = np.asarray(arrays[name])
    if array.size != 1:
        raise ValidationError(name, f"expected a single value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def get_int(arrays: Arrays, name: str, default: int | None = None) -> int | None:
    value = one_value(arrays, name)
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValidationError(name, f"must be an integer, got {value!r}")
    return int(value)


def get_float(arrays: Arrays, name: str, default: float | None = None) -> float | None:
    value = one_value(arrays, name)
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValidationError(name, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(name, f"must be finite, got {number!r}")
    return number


def get_bool(arrays: Arrays, name: str, default: bool = False) -> bool:
    value = one_value(arrays, name)
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise ValidationError(name, f"must be a boolean, got {value!r}")


def get_str(arrays: Arrays, name: str, default: str | None = None) -> str | None:
    value = one_value(arrays, name)
    if value is None:
        return default
    return to_text(name, value)


def get_bytes(arrays: Arrays, name: str) -> bytes | None:
    """The raw bytes of a single STRING/BYTES input, or None when absent."""
    value = one_value(arrays, name)
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    raise ValidationError(name, f"must be bytes, got {type(value).__name__}")


def get_str_list(arrays: Arrays, name: str) -> tuple[str, ...]:
    if name not in arrays:
        return ()
    return tuple(to_text(name, v) for v in np.asarray(arrays[name]).reshape(-1))


def get_int_list(arrays: Arrays, name: str) -> tuple[int, ...]:
    if name not in arrays:
        return ()
    array = np.asarray(arrays[name]).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValidationError(name, f"must be integers, got dtype {array.dtype}")
    return tuple(int(v) for v in array)


def to_text(name: str, value: object) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(name, "is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise ValidationError(name, f"must be a string, got {type(value).__name__}")


def parse_sampling(arrays: Arrays) -> SamplingParams:
    """SamplingParams from the optional inputs, validated (errors name the field)."""
    seed = get_int(arrays, "seed")
    if seed is None:
        seed = get_int(arrays, "random_seed")
    params = SamplingParams(
        max_tokens=get_int(arrays, "max_tokens", 16),  # type: ignore[arg-type]
        temperature=get_float(arrays, "temperature", 1.0),  # type: ignore[arg-type]
        top_p=get_float(arrays, "top_p", 1.0),  # type: ignore[arg-type]
        top_k=get_int(arrays, "top_k", 0),  # type: ignore[arg-type]
        seed=seed,
        stop_token_ids=get_int_list(arrays, "stop_token_ids"),
        min_tokens=get_int(arrays, "min_tokens", 0),  # type: ignore[arg-type]
        ignore_eos=get_bool(arrays, "ignore_eos"),
    )
    params.validate()
    return params


# ---- router -> worker ---------------------------------------------------------------
def encode_generate_inputs(request: GenerateRequest) -> dict[str, np.ndarray]:
    s = request.sampling
    out: dict[str, np.ndarray] = {
        "input_ids": np.asarray(request.input_ids, dtype=np.int32),
        "request_id": _strings([request.request_id]),
        "max_tokens": np.array([s.max_tokens], dtype=np.int32),
        "min_tokens": np.array([s.min_tokens], dtype=np.int32),
        "temperature": np.array([s.temperature], dtype=np.float32),
        "top_p": np.array([s.top_p], dtype=np.float32),
        "top_k": np.array([s.top_k], dtype=np.int32),
        "ignore_eos": np.array([s.ignore_eos], dtype=np.bool_),
    }
    if s.seed is not None:
        out["seed"] = np.array([s.seed], dtype=np.uint64)
    if s.stop_token_ids:
        out["stop_token_ids"] = np.asarray(s.stop_token_ids, dtype=np.int32)
    if request.hold_kv:
        out["hold_kv"] = np.array([True], dtype=np.bool_)
    if request.kv_descriptor is not None:
        out["kv_descriptor"] = np.array([request.kv_descriptor], dtype=np.object_)
        out["first_token"] = np.array([request.first_token or 0], dtype=np.int32)
    return out


def encode_abort_inputs(request_id: str) -> dict[str, np.ndarray]:
    return {"abort_request_id": _strings([request_id])}


def parse_generate_inputs(arrays: Arrays, default_request_id: str) -> GenerateRequest | AbortCommand:
    """Rebuild what the router sent; raise `ValidationError` naming a bad input."""
    abort_id = get_str(arrays, "abort_request_id")
    if abort_id is not None:
        return AbortCommand(abort_id)
    if "input_ids" not in arrays:
        raise ValidationError("input_ids", "is required")
    ids = get_int_list(arrays, "input_ids")
    request_id = get_str(arrays, "request_id") or default_request_id
    kv_descriptor = get_bytes(arrays, "kv_descriptor")
    first_token = get_int(arrays, "first_token")
    if kv_descriptor is not None and not kv_descriptor:
        raise ValidationError("kv_descriptor", "must not be empty")
    if first_token is not None and first_token < 0:
        raise ValidationError("first_token", f"must be a token id >= 0, got {first_token}")
    if (kv_descriptor is None) != (first_token is None):
        missing = "first_token" if first_token is None else "kv_descriptor"
        raise ValidationError(missing, "kv_descriptor and first_token go together")
    return GenerateRequest(
        request_id=request_id, input_ids=ids, sampling=parse_sampling(arrays),
        hold_kv=get_bool(arrays, "hold_kv"), kv_descriptor=kv_descriptor, first_token=first_token,
    )


# ---- worker -> router ---------------------------------------------------------------
def encode_chunk_outputs(chunk: TokenChunk) -> dict[str, np.ndarray]:
    return {
        "output_ids": np.asarray(chunk.output_ids, dtype=np.int32),
        "finish_reason": _strings([chunk.finish_reason or ""]),
        "num_input_tokens": np.array([chunk.num_input_tokens], dtype=np.int32),
        "num_output_tokens": np.array([len(chunk.output_ids)], dtype=np.int32),
        "cached_tokens": np.array([chunk.cached_tokens], dtype=np.int32),
        "kv_descriptor": np.array([chunk.kv_descriptor or b""], dtype=np.object_),
    }


def decode_chunk_outputs(arrays: Arrays, request_id: str) -> TokenChunk:
    reason = get_str(arrays, "finish_reason", "") or None
    return TokenChunk(
        request_id=request_id,
        output_ids=get_int_list(arrays, "output_ids"),
        finished=reason is not None,
        finish_reason=reason,
        num_input_tokens=get_int(arrays, "num_input_tokens", 0) or 0,
        cached_tokens=get_int(arrays, "cached_tokens", 0) or 0,
        kv_descriptor=get_bytes(arrays, "kv_descriptor") or None,
    )


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)
