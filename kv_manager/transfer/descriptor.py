"""`KVDescriptor` <-> bytes: one version byte, then a msgpack map.

The bytes travel from the prefill worker through the router to a decode worker (as a Triton
BYTES tensor), so decoding validates every field and names the bad one in a
`KVTransferError`; nothing in a descriptor is trusted before it has been checked.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from kv_manager.transfer.base import KVDescriptor
from trident.core.errors import KVTransferError

DESCRIPTOR_VERSION = 1
MAX_BLOCKS = 1 << 20
_U64 = 1 << 64
_ADDR_SCHEMES = ("ipc://", "tcp://")


def encode_descriptor(desc: KVDescriptor) -> bytes:
    body = {
        "worker_id": desc.worker_id,
        "pool_handle": desc.pool_handle,
        "fingerprint": desc.fingerprint,
        "block_ids": list(desc.block_ids),
        "num_tokens": desc.num_tokens,
        "block_hashes": list(desc.block_hashes),
        "lease_id": desc.lease_id,
        "lease_expiry": float(desc.lease_expiry),
        "release_addr": desc.release_addr,
    }
    return bytes((DESCRIPTOR_VERSION,)) + msgpack.packb(body, use_bin_type=True)


def decode_descriptor(data: bytes) -> KVDescriptor:
    """Parse and validate descriptor bytes; raises `KVTransferError` naming the bad field."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KVTransferError(f"kv descriptor: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise KVTransferError("kv descriptor: empty")
    if data[0] != DESCRIPTOR_VERSION:
        raise KVTransferError(
            f"kv descriptor: version {data[0]} not supported (this worker speaks {DESCRIPTOR_VERSION})"
        )
    try:
        body = msgpack.unpackb(data[1:], raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise KVTransferError(f"kv descriptor: not valid msgpack ({e})") from e
    if not isinstance(body, dict):
        raise KVTransferError("kv descriptor: expected a map")
    block_ids = _int_list(body, "block_ids", 0, 1 << 31)
    block_hashes = _int_list(body, "block_hashes", 0, _U64)
    num_tokens = _get(body, "num_tokens", int)
    if num_tokens <= 0:
        raise KVTransferError(f"kv descriptor.num_tokens: must be positive, got {num_tokens}")
    if not block_ids:
        raise KVTransferError("kv descriptor.block_ids: empty")
    if len(block_hashes) > len(block_ids):
        raise KVTransferError(
            f"kv descriptor.block_hashes: {len(block_hashes)} hashes for {len(block_ids)} blocks"
        )
    expiry = _get(body, "lease_expiry", float)
    if not math.isfinite(expiry):
        raise KVTransferError("kv descriptor.lease_expiry: not a finite time")
    release_addr = _get(body, "release_addr", str)
    if not release_addr.startswith(_ADDR_SCHEMES):
        raise KVTransferError(f"kv descriptor.release_addr: unsupported address {release_addr!r}")
    fingerprint = _get(body, "fingerprint", str)
    lease_id = _get(body, "lease_id", str)
    worker_id = _get(body, "worker_id", str)
    for name, value in (
        ("fingerprint", fingerprint),
        ("lease_id", lease_id),
        ("worker_id", worker_id),
    ):
        if not value or len(value) > 256:
            raise KVTransferError(f"kv descriptor.{name}: must be 1 to 256 characters")
    return KVDescriptor(
        worker_id=worker_id,
        pool_handle=_get(body, "pool_handle", bytes),
        fingerprint=fingerprint,
        block_ids=tuple(block_ids),
        num_tokens=num_tokens,
        block_hashes=tuple(block_hashes),
        lease_id=lease_id,
        lease_expiry=expiry,
        release_addr=release_addr,
    )


def _get(body: dict[str, Any], name: str, typ: type) -> Any:
    if name not in body:
        raise KVTransferError(f"kv descriptor.{name}: missing")
    value = body[name]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise KVTransferError(
            f"kv descriptor.{name}: expected {typ.__name__}, got {type(value).__name__}"
        )
    return value


def _int_list(body: dict[str, Any], name: str, lo: int, hi: int) -> list[int]:
    values = _get(body, name, list)
    if len(values) > MAX_BLOCKS:
        raise KVTransferError(f"kv descriptor.{name}: {len(values)} entries (at most {MAX_BLOCKS})")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < hi:
            raise KVTransferError(f"kv descriptor.{name}: {v!r} is not an int in [{lo}, {hi})")
    return values
