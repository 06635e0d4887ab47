"""KV transfer between nodes through NIXL, the transfer library Dynamo uses.

On one node, peers map each other's pools (POSIX shared memory, CUDA IPC). Across nodes
they cannot, so the prefill worker registers its pool with a NIXL agent (UCX backend; DRAM
on CPU, VRAM on a GPU) and its pool handle carries the agent's metadata and the pool's base
address instead of a segment name; the decode worker READs the descriptor's blocks straight
into its own blocks. The descriptor and lease protocol stay the same: the same exporter
pins the blocks under a lease, the same importer checks the descriptor and releases it.

Peers are authenticated before their metadata is accepted: the handle carries an HMAC-SHA256
over everything in it, keyed by a secret both sides share (`TRIDENT_KV_SECRET_FILE`, a file
holding it, or `TRIDENT_KV_SECRET`; never argv). A handle without a valid tag is refused
and logged, and no agent is added for it.

Who calls what:
- the prefill engine's setup wraps its pool: `NixlPool(memory, name, secret)`; the engine
  keeps owning the pool and closes the wrapper (which deregisters) before the pool;
- `KVImporterImpl` builds one `NixlReader` on first sight of a NIXL handle and calls `read`
  on its loader thread (one thread); the reader owns its agent, the remote agents it added
  and its registrations, never a block.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer.base import KVPoolMemory
from kv_manager.transfer.handle import PoolHandle, encode_handle, signed_fields
from trident.core.cluster_secret import SECRET_ENV, SECRET_FILE_ENV
from trident.core.errors import ConfigError, KVTransferError

log = logging.getLogger(__name__)

_XFER_POLLS_PER_CHECK = 1 << 14


def sign(handle: PoolHandle, secret: bytes) -> str:
    return hmac.new(secret, signed_fields(handle), hashlib.sha256).hexdigest()


def nixl_api() -> Any:
    """NIXL's Python API: `nixl` (NIXL's own wheel) or `nixl_cu12` (the CUDA 12 wheel, whose
    UCX backend moves DRAM on a CPU-only machine too). `KVTransferError` when neither imports."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL prints INFO lines to stdout otherwise
    # UCX's TCP transport moves 64 KiB segments by default; a KV block is ~100 KiB to MiBs, and
    # 256 KiB segments took a 90 MiB pull over TCP from 1.1 to 3.9 GB/s here (benchmarks.kv_transfer
    # --transport nixl). Read when the UCX backend starts; a value set by the operator wins.
    for name in ("UCX_TCP_RX_SEG_SIZE", "UCX_TCP_TX_SEG_SIZE"):
        os.environ.setdefault(name, "256k")
    for name in ("nixl._api", "nixl_cu12._api"):
        try:
            __import__(name)
            return sys.modules[name]
        except ImportError:
            continue
    raise KVTransferError("KV transfer over NIXL needs the nixl (or nixl-cu12) package")


def _agent(api: Any, prefix: str) -> Any:
    # Names must be unique among the peers an agent meets: a restarted worker is a new agent.
    # NIXL's own progress thread spins (it keeps a core busy while idle), so none: the reader
    # progresses its transfers by polling them, the pool runs a progress thread that sleeps.
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    return api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


def _mem_type(tensor: torch.Tensor) -> str:
    return "VRAM" if tensor.is_cuda else "DRAM"


def _device_id(tensor: torch.Tensor) -> int:
    return (tensor.device.index or 0) if tensor.is_cuda else 0


def _block_rows(base: int, num_blocks: int, block_nbytes: int, device_id: int) -> np.ndarray:
    """NIXL's (address, length, device) rows, one per block of a pool starting at `base`."""
    rows = np.empty((num_blocks, 3), np.uint64)
    rows[:, 0] = np.uint64(base) + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_nbytes)
    rows[:, 1] = block_nbytes
    rows[:, 2] = device_id
    return rows


class NixlPool:
    """A `KVPoolMemory` whose `handle()` lets a peer on another node READ its blocks.

    Wraps the engine's pool (any kind: plain, shared memory, CUDA) and registers its tensor
    with a fresh NIXL agent. `tensor`, `layout` and `num_blocks` are the wrapped pool's.
    A READ needs the target's UCX worker to make progress (connection setup; over TCP every
    fragment), so a daemon thread ("kv-nixl-progress") progresses it every `progress_s`
    (0.2 ms: about what NIXL's spinning thread reaches on TCP, for a few percent of a core)."""

    def __init__(
        self, memory: KVPoolMemory, name: str, secret: bytes | None, *, progress_s: float = 2e-4
    ) -> None:
        if not secret:
            raise ConfigError(
                f"{SECRET_FILE_ENV}: KV transfer across nodes needs a shared secret "
                f"({SECRET_FILE_ENV} or {SECRET_ENV}) so that peers can be authenticated"
            )
        self.memory = memory
        self.tensor = memory.tensor
        self.layout = memory.layout
        self.num_blocks = memory.num_blocks
        self._api = nixl_api()
        self._agent = _agent(self._api, name)
        self._reg = self._agent.register_memory(self.tensor)
        handle = PoolHandle(
            kind="nixl",
            pool_id=f"nixl-{self._agent.name}",
            pid=os.getpid(),
            layout=self.layout,
            num_blocks=self.num_blocks,
            nixl_agent=self._agent.name,
            nixl_meta=self._agent.get_agent_metadata(),
            base_addr=self.tensor.data_ptr(),
            mem_type=_mem_type(self.tensor),
            device_id=_device_id(self.tensor),
        )
        self._handle = encode_handle(handle, auth=sign(handle, secret))
        self._closed = False
        self._stop = threading.Event()
        self._progress_s = progress_s
        self._thread = threading.Thread(target=self._progress, name="kv-nixl-progress", daemon=True)
        self._thread.start()

    def handle(self) -> bytes:
        return self._handle

    def _progress(self) -> None:
        while not self._stop.wait(self._progress_s):
            try:
                self._agent.get_new_notifs()  # progresses the UCX worker
            except Exception:
                log.exception("NIXL progress failed; peers can no longer read this pool")
                return

    def close(self) -> None:
        """Stop the progress thread and deregister the pool (the wrapped pool stays open:
        its owner closes it). Idempotent."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._thread.join()
            self._agent.deregister_memory(self._reg)


class NixlReader:
    """READs blocks of authenticated remote pools into local pools. One thread at a time
    (the importer's loader thread). Remote agents are added once per pool and kept, least
    recently used beyond `max_peers` removed; a local pool is registered on first use."""

    def __init__(self, secret: bytes | None, *, max_peers: int = 32) -> None:
        self._secret = secret
        self._max_peers = max(1, max_peers)
        self._api = nixl_api()
        self._agent = _agent(self._api, "trident-kv-reader")
        self._remotes: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # pool_id -> (agent, dlist)
        self._locals: dict[tuple[int, int], tuple[Any, Any]] = {}  # (ptr, nbytes) -> (reg, dlist)

    def verify(self, handle: PoolHandle) -> None:
        """Raise `KVTransferError` (and log) unless `handle` is signed with our secret."""
        if not self._secret:
            raise KVTransferError(
                f"kv descriptor: worker pool {handle.pool_id} is reached over NIXL, and this "
                f"worker has no KV secret ({SECRET_FILE_ENV} or {SECRET_ENV}) to authenticate it"
            )
        if not hmac.compare_digest(handle.auth, sign(handle, self._secret)):
            log.warning(
                "refused KV pool %s of agent %s (pid %d): its handle is not signed with this "
                "cluster's KV secret", handle.pool_id, handle.nixl_agent, handle.pid,
            )
            raise KVTransferError(
                f"kv descriptor: the pool handle of {handle.nixl_agent} is not signed with this "
                "cluster's KV secret; peer refused"
            )

    def read(self, handle: PoolHandle, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
        """Copy remote blocks `src_ids` into `dst[dst_ids]`; returns when they are in place."""
        if not src_ids:  # the whole prompt was cached here already: NIXL refuses empty lists
            return
        agent, remote = self.peer(handle)
        local = self._local(dst, handle.layout)
        xfer = self._agent.make_prepped_xfer(
            "READ", local, np.asarray(dst_ids, np.int32), remote, np.asarray(src_ids, np.int32)
        )
        try:
            state = self._agent.transfer(xfer)
            while state == "PROC":
                state = self._agent.check_xfer_state(xfer)
        finally:
            xfer.release()
        if state != "DONE":
            raise KVTransferError(f"NIXL READ of {len(src_ids)} blocks from {agent} ended in {state}")

    def peer(self, handle: PoolHandle) -> tuple[str, Any]:
        """(agent name, prepared block list) of `handle`'s pool: verified and added on first
        sight (the importer's `open`), looked up afterwards."""
        found = self._remotes.get(handle.pool_id)
        if found is not None:
            self._remotes.move_to_end(handle.pool_id)
            return found
        self.verify(handle)
        agent = self._agent.add_remote_agent(handle.nixl_meta)
        agent = agent.decode() if isinstance(agent, bytes) else agent
        rows = _block_rows(handle.base_addr, handle.num_blocks, handle.layout.block_nbytes, handle.device_id)
        found = (agent, self._agent.prep_xfer_dlist(agent, rows, handle.mem_type))
        self._remotes[handle.pool_id] = found
        while len(self._remotes) > self._max_peers:
            _, (old, dlist) = self._remotes.popitem(last=False)
            dlist.release()
            self._agent.remove_remote_agent(old)
        log.info("added NIXL peer %s for KV pool %s", agent, handle.pool_id)
        return found

    def _local(self, dst: torch.Tensor, layout: KVLayout) -> Any:
        key = (dst.data_ptr(), dst.numel() * dst.element_size())
        found = self._locals.get(key)
        if found is None:
            reg = self._agent.register_memory(dst)
            rows = _block_rows(dst.data_ptr(), dst.shape[0], layout.block_nbytes, _device_id(dst))
            found = (reg, self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows, _mem_type(dst)))
            self._locals[key] = found
        return found[1]

    def close(self) -> None:
        for _, dlist in self._remotes.values():
            dlist.release()
        for agent, _ in self._remotes.values():
            self._agent.remove_remote_agent(agent)
        self._remotes.clear()
        for reg, dlist in self._locals.values():
            dlist.release()
            self._agent.deregister_memory(reg)
        self._locals.clear()

