"""TensorRT-LLM's `DisaggregatedParams` <-> the opaque state inside Trident's KV descriptor.

Pure functions (no tensorrt_llm import), called by `plugins.trtllm.handoff` on the engine's
loop thread.

TensorRT-LLM moves the KV of a disaggregated request itself: a `context_only` request on the
prefill worker returns, with its first token, a `DisaggregatedParams` (the context request
id, the transceiver's `opaque_state`, the first generated tokens, ...); a `generation_only`
request on the decode worker, given those parameters and the same prompt, has the decode
worker's cache transceiver fetch the KV from the prefill worker. Trident's router carries
only a `kv_descriptor` (`kv_manager.transfer.descriptor`), so the parameters travel in its
`pool_handle` as a handle of kind "trtllm":

    msgpack {"v": 1, "kind": "trtllm", "layout": [layers, kv_heads, head_dim, block_size,
             dtype, model_id], "params": {<DisaggregatedParams field>: value, ...}}

The rest of the descriptor (lease id and expiry, release address, layout fingerprint, token
count) is Trident's own lease protocol, which bounds how long the prefill worker holds the
KV for a transfer. A torch or vLLM worker handed such a descriptor refuses it
(`pool_handle.kind: unknown kind 'trtllm'`): the blocks are in TensorRT-LLM's pool, which
only a TensorRT-LLM transceiver reads.

Field names and types follow `tensorrt_llm/disaggregated_params.py` of TensorRT-LLM 1.1.0
(`plugins.trtllm.config.TRTLLM_VERSION`); newer optional fields are carried when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from kv_manager.layout import KVLayout
from kv_manager.transfer.handle import parse_layout
from trident.core.errors import KVTransferError

HANDLE_VERSION = 1
HANDLE_KIND = "trtllm"
CONTEXT_ONLY = "context_only"
GENERATION_ONLY = "generation_only"

# DisaggregatedParams fields that cross from prefill to decode, with their accepted types.
_INT_LIST = "int_list"
PARAM_TYPES: dict[str, str] = {
    "first_gen_tokens": _INT_LIST,
    "ctx_request_id": "int",
    "opaque_state": "bytes",
    "draft_tokens": _INT_LIST,
    "disagg_request_id": "int",
    "ctx_dp_rank": "int",
    "ctx_info_endpoint": "str_or_list",
}
_MAX_LIST = 1 << 16
_MAX_BYTES = 1 << 24


def params_from_output(disaggregated_params: Any) -> dict[str, Any]:
    """The fields of a context-only result's `DisaggregatedParams` (or a mapping of them) that
    a generation-only request needs, as plain values; raises `KVTransferError` when the
    result carries none or a field has an unexpected type."""
    if disaggregated_params is None:
        raise KVTransferError(
            "TensorRT-LLM returned no disaggregated_params for a context-only request"
        )
    get = (
        disaggregated_params.get
        if isinstance(disaggregated_params, Mapping)
        else (lambda name: getattr(disaggregated_params, name, None))
    )
    fields = {name: _plain(get(name)) for name in PARAM_TYPES}
    fields = {k: v for k, v in fields.items() if v is not None}
    check_params(fields)
    if "ctx_request_id" not in fields and "disagg_request_id" not in fields:
        raise KVTransferError(
            "disaggregated_params: neither ctx_request_id nor disagg_request_id is set"
        )
    return fields


def generation_params(fields: Mapping[str, Any], first_token: int) -> dict[str, Any]:
    """Keyword arguments of `DisaggregatedParams` for the generation-only request that
    continues a context-only one. `first_token` (the token the router streamed) must be the
    context request's first generated token."""
    first = list(fields.get("first_gen_tokens") or ())
    if first and first[0] != first_token:
        raise KVTransferError(
            f"first_token {first_token} is not the prefill worker's first token {first[0]} "
            "(first_gen_tokens of its disaggregated_params)"
        )
    kwargs = dict(fields)
    kwargs["first_gen_tokens"] = first or [first_token]
    kwargs["request_type"] = GENERATION_ONLY
    return kwargs


def encode_handle(layout: KVLayout, fields: Mapping[str, Any]) -> bytes:
    check_params(fields)
    body = {
        "v": HANDLE_VERSION,
        "kind": HANDLE_KIND,
        "layout": [
            layout.num_layers,
            layout.num_kv_heads,
            layout.head_dim,
            layout.block_size,
            layout.dtype,
            layout.model_id,
        ],
        "params": dict(fields),
    }
    return msgpack.packb(body, use_bin_type=True)


def decode_handle(data: bytes) -> tuple[KVLayout, dict[str, Any]]:
    """The layout and `DisaggregatedParams` fields in a "trtllm" pool handle; raises
    `KVTransferError` naming the bad field."""
    try:
        body = msgpack.unpackb(bytes(data), raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise KVTransferError(f"pool_handle: not a pool handle ({exc})") from exc
    if not isinstance(body, dict):
        raise KVTransferError("pool_handle: not a pool handle (expected a map)")
    if body.get("kind") != HANDLE_KIND:
        raise KVTransferError(
            f"pool_handle.kind: {body.get('kind')!r} is not a TensorRT-LLM handoff; a TensorRT-LLM worker "
            "only takes KV prefilled by a TensorRT-LLM prefill worker"
        )
    if body.get("v") != HANDLE_VERSION:
        raise KVTransferError(
            f"pool_handle.v: version {body.get('v')!r} not supported (this worker speaks 1)"
        )
    params = body.get("params")
    if not isinstance(params, dict):
        raise KVTransferError("pool_handle.params: expected a map")
    check_params(params)
    return parse_layout(body.get("layout")), params


def check_params(fields: Mapping[str, Any]) -> None:
    for name, value in fields.items():
        kind = PARAM_TYPES.get(name)
        if kind is None:
            raise KVTransferError(
                f"pool_handle.params.{name}: not a DisaggregatedParams field this worker carries"
            )
        if not _is(kind, value):
            raise KVTransferError(
                f"pool_handle.params.{name}: expected {kind}, got {type(value).__name__}"
            )


def _is(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT_LIST:
        return (
            isinstance(value, list)
            and len(value) <= _MAX_LIST
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    if kind == "bytes":
        return isinstance(value, bytes) and len(value) <= _MAX_BYTES
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _plain(value: Any) -> Any:
    """Bindings' sequences and byte buffers as msgpack-friendly lists and bytes."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__int__") and not hasattr(value, "__len__"):  # an enum or numpy scalar
        return int(value)
    return list(value)
