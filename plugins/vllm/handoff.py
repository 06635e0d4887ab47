"""The request side of a KV handoff on a vLLM worker: the keys `VllmEngine` puts in vLLM's
`kv_transfer_params` for the connector (`plugins.vllm.connector`), and the checks `submit`
makes so that a request the handoff cannot serve fails at once, naming its field.
"""

from __future__ import annotations

from plugins.base import EngineInfo
from plugins.vllm.kv_bridge import KVBridge
from trident.core.errors import KVTransferError, ValidationError
from trident.core.types import GenerateRequest

HOLD = "trident_hold_kv"  # prefill: stage the prompt and lease it when the request ends
DESCRIPTOR = "trident_kv_descriptor"  # decode: load the prompt from here; prefill: the lease


def check_hold(request: GenerateRequest, bridge: KVBridge | None, info: EngineInfo) -> None:
    if bridge is None or bridge.staging is None:
        raise ValidationError(
            "hold_kv", "this vLLM worker has no shareable staging pool (shareable_kv=false): it is not a prefill worker"
        )
    blocks = -(-len(request.input_ids) // info.block_size)
    if blocks > bridge.staging_blocks:
        raise ValidationError(
            "hold_kv",
            f"a prompt of {len(request.input_ids)} tokens needs {blocks} staging blocks; this worker's "
            f"staging pool holds {bridge.staging_blocks} (raise kv_staging_mb)",
        )


def check_descriptor(request: GenerateRequest, info: EngineInfo) -> None:
    from kv_manager.transfer.descriptor import decode_descriptor
    from kv_manager.transfer.handle import decode_handle
    from kv_manager.transfer.importer import check_layout

    if request.first_token is None:
        raise ValidationError("first_token", "required with kv_descriptor")
    try:
        desc = decode_descriptor(request.kv_descriptor or b"")
        check_layout(desc, decode_handle(desc.pool_handle), info.kv_layout)
    except KVTransferError as exc:
        raise ValidationError("kv_descriptor", str(exc)) from exc
    if desc.num_tokens != len(request.input_ids):
        raise ValidationError(
            "kv_descriptor", f"covers {desc.num_tokens} tokens, the prompt has {len(request.input_ids)}"
        )


def release_lease(bridge: KVBridge | None, descriptor: bytes) -> None:
    """End a lease nobody will pull (a decode request with nothing left to generate, a
descriptor the connector could not open); raises `KVTransferError` if it does not parse."""
    from kv_manager.transfer.descriptor import decode_descriptor

    if bridge is not None:
        bridge.importer.release(decode_descriptor(descriptor))
