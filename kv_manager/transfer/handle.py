"""The bytes that tell a peer process how to map a KV pool (`KVPoolMemory.handle()`).

A handle names the pool's memory (a POSIX shared-memory segment, a CUDA IPC handle plus
the GPU's UUID, or, for a peer on another node, a NIXL agent's metadata and the pool's base
address, signed: `kv_manager.transfer.nixl`), the owner's pid, the pool's size and its full layout. The layout travels so
that a decode worker that refuses a mismatched pool can say what the peer has, not only that
the fingerprints differ. Handles are built by the pools (`shm_pool`, `cuda_pool`) and parsed
by `KVImporter`; nothing else looks inside.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from kv_manager.layout import DTYPE_SIZES, KVLayout
from trident.core.errors import KVTransferError

HANDLE_VERSION = 1
SHM_PREFIX = "trident_kv_"
SHM_NAME_RE = re.compile(r"^trident_kv_[0-9]+_[0-9a-f]{32}$")
_KINDS = ("shm", "cuda", "local", "nixl")
_MEM_TYPES = ("DRAM", "VRAM")
_AUTH_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class PoolHandle:
    """A parsed pool handle. `pool_id` is unique per pool and keys the importer's cache.

    kind "shm": `shm_name` is the segment name (no leading slash).
    kind "cuda": `cuda_ipc` is the tuple `UntypedStorage._share_cuda_()` returned and
    `device_uuid` the GPU it lives on (device indices differ between processes).
    kind "local": reachable only from the owning process (non-shareable pools).
    kind "nixl": `nixl_agent` / `nixl_meta` name the owner's NIXL agent, `base_addr`,
    `mem_type` and `device_id` where block 0 starts; `auth` is the HMAC-SHA256 (hex) of
    `signed_fields`, checked by the reader before it accepts the agent.
    """

    kind: str
    pool_id: str
    pid: int
    layout: KVLayout
    num_blocks: int
    shm_name: str = ""
    device_uuid: str = ""
    cuda_ipc: tuple[Any, ...] = ()
    nixl_agent: str = ""
    nixl_meta: bytes = b""
    base_addr: int = 0
    mem_type: str = ""
    device_id: int = 0
    auth: str = ""

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.block_nbytes


def encode_handle(h: PoolHandle, auth: str = "") -> bytes:
    body = _body(h)
    if h.kind == "nixl":
        body["auth"] = auth or h.auth
    return msgpack.packb(body, use_bin_type=True)


def signed_fields(h: PoolHandle) -> bytes:
    """The bytes a NIXL handle's `auth` tag covers: every field but the tag."""
    return msgpack.packb(_body(h), use_bin_type=True)


def _body(h: PoolHandle) -> dict[str, Any]:
    lay = h.layout
    body = {
        "v": HANDLE_VERSION,
        "kind": h.kind,
        "pool_id": h.pool_id,
        "pid": h.pid,
        "num_blocks": h.num_blocks,
        "layout": [
            lay.num_layers,
            lay.num_kv_heads,
            lay.head_dim,
            lay.block_size,
            lay.dtype,
            lay.model_id,
        ],
        "shm_name": h.shm_name,
        "device_uuid": h.device_uuid,
        "cuda_ipc": list(h.cuda_ipc),
    }
    if h.kind == "nixl":
        body.update(
            nixl_agent=h.nixl_agent, nixl_meta=h.nixl_meta, base_addr=h.base_addr,
            mem_type=h.mem_type, device_id=h.device_id,
        )
    return body


def decode_handle(data: bytes) -> PoolHandle:
    """Parse and validate a handle; raises `KVTransferError` naming the bad field."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise KVTransferError(f"pool_handle: not a pool handle ({e})") from e
    if not isinstance(body, dict):
        raise KVTransferError("pool_handle: not a pool handle (expected a map)")
    if body.get("v") != HANDLE_VERSION:
        raise KVTransferError(
            f"pool_handle: version {body.get('v')!r} not supported (this worker speaks "
            f"{HANDLE_VERSION})"
        )
    kind = _field(body, "kind", str)
    if kind not in _KINDS:
        raise KVTransferError(f"pool_handle.kind: unknown kind {kind!r}")
    num_blocks = _field(body, "num_blocks", int)
    if num_blocks <= 0:
        raise KVTransferError(f"pool_handle.num_blocks: must be positive, got {num_blocks}")
    handle = PoolHandle(
        kind=kind,
        pool_id=_field(body, "pool_id", str),
        pid=_field(body, "pid", int),
        layout=parse_layout(body.get("layout")),
        num_blocks=num_blocks,
        shm_name=_field(body, "shm_name", str),
        device_uuid=_field(body, "device_uuid", str),
        cuda_ipc=tuple(_field(body, "cuda_ipc", list)),
    )
    if kind == "shm" and not SHM_NAME_RE.match(handle.shm_name):
        raise KVTransferError(f"pool_handle.shm_name: not a Trident segment: {handle.shm_name!r}")
    if kind == "cuda" and (len(handle.cuda_ipc) != 8 or not handle.device_uuid):
        raise KVTransferError("pool_handle.cuda_ipc: malformed CUDA IPC handle")
    if kind == "nixl":
        handle = _nixl_fields(handle, body)
    return handle


def _nixl_fields(handle: PoolHandle, body: dict[str, Any]) -> PoolHandle:
    agent = _field(body, "nixl_agent", str)
    if not 0 < len(agent) <= 256:
        raise KVTransferError("pool_handle.nixl_agent: must be 1 to 256 characters")
    meta = _field(body, "nixl_meta", bytes)
    if not meta:
        raise KVTransferError("pool_handle.nixl_meta: empty")
    base = _field(body, "base_addr", int)
    if not 0 < base < 1 << 64:
        raise KVTransferError(f"pool_handle.base_addr: {base!r} is not an address")
    mem_type = _field(body, "mem_type", str)
    if mem_type not in _MEM_TYPES:
        raise KVTransferError(f"pool_handle.mem_type: expected one of {_MEM_TYPES}, got {mem_type!r}")
    device_id = _field(body, "device_id", int)
    if not 0 <= device_id < 1 << 16:
        raise KVTransferError(f"pool_handle.device_id: {device_id!r} is not a device")
    auth = _field(body, "auth", str)
    if not _AUTH_RE.match(auth):
        raise KVTransferError("pool_handle.auth: missing or malformed tag")
    return dataclasses.replace(
        handle, nixl_agent=agent, nixl_meta=meta, base_addr=base, mem_type=mem_type,
        device_id=device_id, auth=auth,
    )


def _field(body: dict[str, Any], name: str, typ: type) -> Any:
    value = body.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise KVTransferError(
            f"pool_handle.{name}: expected {typ.__name__}, got {type(value).__name__}"
        )
    return value


def parse_layout(raw: Any) -> KVLayout:
    """The `KVLayout` of a handle's msgpack `layout` field (also read by `plugins.trtllm.disagg`)."""
    if not isinstance(raw, list) or len(raw) != 6:
        raise KVTransferError("pool_handle.layout: expected 6 fields")
    layers, heads, head_dim, block_size, dtype, model_id = raw
    for name, v in (
        ("num_layers", layers),
        ("num_kv_heads", heads),
        ("head_dim", head_dim),
        ("block_size", block_size),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise KVTransferError(f"pool_handle.layout.{name}: expected a positive int, got {v!r}")
    if dtype not in DTYPE_SIZES:
        raise KVTransferError(f"pool_handle.layout.dtype: unknown dtype {dtype!r}")
    if not isinstance(model_id, str):
        raise KVTransferError("pool_handle.layout.model_id: expected str")
    return KVLayout(layers, heads, head_dim, block_size, dtype, model_id)
