"""The decode side of a KV handoff: check a descriptor, map the peer pool, copy, release.

Peer pools are mapped once per pool and cached (a pool on another node is not mapped: it is
READ through NIXL, `kv_manager.transfer.nixl`, after its handle's tag is checked) (least recently used beyond `max_peers` are
dropped, and so are shared-memory peers whose segment has been unlinked, checked whenever a
new peer is mapped). Release sockets are cached per address the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq

from kv_manager.layout import KVLayout
from kv_manager.transfer.base import KVDescriptor
from kv_manager.transfer.blockcopy import BlockCopier, check_ids
from kv_manager.transfer.cuda_pool import open_cuda
from kv_manager.transfer.descriptor import decode_descriptor
from kv_manager.transfer.handle import PoolHandle, decode_handle
from kv_manager.transfer.local_pool import lookup_local, torch_dtype
from kv_manager.transfer.nixl import NixlReader
from kv_manager.transfer.shm_pool import attach_shm, segment_exists
from trident.core.errors import KVTransferError

log = logging.getLogger(__name__)

_RELEASE_LINGER_MS = 1000


def check_layout(desc: KVDescriptor, handle: PoolHandle, layout: KVLayout) -> None:
    """Raise `KVTransferError` unless the descriptor's blocks are in `layout`."""
    fingerprint = layout.fingerprint()
    if desc.fingerprint != fingerprint or handle.layout.fingerprint() != fingerprint:
        raise KVTransferError(
            f"KV layout mismatch: worker {desc.worker_id} has {handle.layout.describe()} "
            f"(fingerprint {desc.fingerprint}), this worker has {layout.describe()} "
            f"(fingerprint {fingerprint}); its blocks cannot be used here"
        )


@dataclass(frozen=True, slots=True)
class _Peer:
    handle: PoolHandle
    tensor: torch.Tensor


class KVImporterImpl:
    """Pulls a prefill worker's KV blocks into this worker's pool.

    Built by the decode engine at start; every method runs on its KV loader thread (one
    thread; `close()` on the loop thread at shutdown, after the loader has stopped). For
    each request: `open()` the descriptor, allocate blocks in the engine's own pool, `pull()`
    into them (returns when the data is in place), then `release()` the lease whether or not
    the pull worked. The importer owns the peer mappings and sockets, never any block;
    `close()` (idempotent) unmaps and closes everything.
    """

    def __init__(
        self,
        layout: KVLayout,
        *,
        copy_threads: int | None = None,
        max_peers: int = 32,
        secret: bytes | None = None,
    ) -> None:
        self.layout = layout
        self._fingerprint = layout.fingerprint()
        self._dtype = torch_dtype(layout)
        self._copier = BlockCopier(copy_threads)
        self._max_peers = max(1, max_peers)
        self._handles: OrderedDict[bytes, PoolHandle] = OrderedDict()
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()
        self._secret = secret  # authenticates NIXL peers (pools on other nodes)
        self._nixl: NixlReader | None = None
        self._closed = False

    # -- open --------------------------------------------------------------------------
    def open(self, descriptor: bytes) -> KVDescriptor:
        """Parse and check a descriptor and map its pool; raises `KVTransferError`."""
        self._check_open()
        desc = decode_descriptor(descriptor)
        handle = self._parse_handle(desc.pool_handle)
        check_layout(desc, handle, self.layout)
        now = time.time()
        if desc.lease_expiry <= now:
            raise KVTransferError(
                f"KV lease {desc.lease_id} of worker {desc.worker_id} expired "
                f"{now - desc.lease_expiry:.1f} s ago"
            )
        if len(desc.block_ids) * self.layout.block_size < desc.num_tokens:
            raise KVTransferError(
                f"kv descriptor.num_tokens: {desc.num_tokens} tokens do not fit in "
                f"{len(desc.block_ids)} blocks of {self.layout.block_size}"
            )
        check_ids("kv descriptor.block_ids", desc.block_ids, handle.num_blocks)
        if handle.kind == "nixl":
            self._reader().peer(handle)  # the tag is checked before the agent is added
        else:
            self._peer(handle)
        return desc

    # -- pull --------------------------------------------------------------------------
    def pull(self, desc: KVDescriptor, dst_pool: torch.Tensor, dst_block_ids: list[int]) -> None:
        """Copy `desc.block_ids[i]` of the peer pool into `dst_pool[dst_block_ids[i]]`."""
        self._check_open()
        self._check_dst(dst_pool)
        if len(dst_block_ids) != len(desc.block_ids):
            raise KVTransferError(
                f"dst_block_ids: {len(dst_block_ids)} blocks for {len(desc.block_ids)} source blocks"
            )
        dst_ids = check_ids("dst_block_ids", dst_block_ids, dst_pool.shape[0])
        if len(set(dst_ids)) != len(dst_ids):
            raise KVTransferError("dst_block_ids: a block appears twice")
        handle = self._parse_handle(desc.pool_handle)
        if handle.kind == "nixl":
            reader = self._reader()
            self._under_lease(desc, handle, lambda src_ids: reader.read(handle, dst_pool, src_ids, dst_ids))
            return
        self.read(desc, lambda peer, src_ids: self._copier.copy(peer, dst_pool, src_ids, dst_ids))

    def read(self, desc: KVDescriptor, copy: Callable[[torch.Tensor, list[int]], None]) -> None:
        """Run `copy(peer_pool, src_ids)` under the lease: `src_ids` (`desc.block_ids`) are
        checked against the peer pool first, and the lease must be live before and after.

        For a destination that is not a pool in this layout (vLLM's own per-layer cache):
        `copy` reads `peer_pool[src_ids]` (read-only on CPU) and writes where it likes."""
        self._check_open()
        handle = self._parse_handle(desc.pool_handle)
        if handle.kind == "nixl":
            raise KVTransferError(
                f"KV pool of worker {desc.worker_id} is on another node (NIXL): it can only be "
                "pulled into a pool in this layout"
            )
        peer = self._peer(handle)
        self._under_lease(desc, handle, lambda src_ids: copy(peer.tensor, src_ids))

    def _under_lease(self, desc: KVDescriptor, handle: PoolHandle, copy: Callable[[list[int]], None]) -> None:
        # The copy moves raw pointers: an id out of range must never reach it.
        src_ids = check_ids("kv descriptor.block_ids", desc.block_ids, handle.num_blocks)
        if time.time() >= desc.lease_expiry:
            raise KVTransferError(
                f"KV lease {desc.lease_id} of worker {desc.worker_id} has expired"
            )
        copy(src_ids)
        if time.time() >= desc.lease_expiry:
            # The exporter frees only after a grace period, but past the expiry there is no
            # promise left: the caller must recompute instead of trusting these blocks.
            raise KVTransferError(
                f"KV lease {desc.lease_id} of worker {desc.worker_id} expired during the pull"
            )

    def peer_pool(self, desc: KVDescriptor) -> torch.Tensor:
        """The mapped peer pool of `desc` (read-only on CPU); for diagnostics and benchmarks."""
        return self._peer(self._parse_handle(desc.pool_handle)).tensor

    def _check_dst(self, dst: torch.Tensor) -> None:
        if not isinstance(dst, torch.Tensor):
            raise KVTransferError(f"dst_pool: expected a tensor, got {type(dst).__name__}")
        if tuple(dst.shape[1:]) != self.layout.block_shape or dst.dtype != self._dtype:
            raise KVTransferError(
                f"dst_pool: shape {tuple(dst.shape)} {dst.dtype} is not a pool of "
                f"{self.layout.describe()}"
            )
        if not dst.is_contiguous():
            raise KVTransferError("dst_pool: must be contiguous")

    # -- release -----------------------------------------------------------------------
    def release(self, desc: KVDescriptor) -> None:
        """Tell the prefill worker it may free the lease (best effort: else it expires)."""
        if self._closed:
            return
        sock = self._sockets.get(desc.release_addr)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, _RELEASE_LINGER_MS)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(desc.release_addr)
            self._sockets[desc.release_addr] = sock
            while len(self._sockets) > self._max_peers:
                _, old = self._sockets.popitem(last=False)
                old.close()
        else:
            self._sockets.move_to_end(desc.release_addr)
        try:
            sock.send(desc.lease_id.encode("ascii"), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning(
                "worker=%s: could not release KV lease %s (%s); it will expire",
                desc.worker_id,
                desc.lease_id,
                e,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._peers.clear()
        self._handles.clear()
        self._copier.close()
        if self._nixl is not None:
            self._nixl.close()
            self._nixl = None

    # -- peers -------------------------------------------------------------------------
    def _reader(self) -> NixlReader:
        if self._nixl is None:
            self._nixl = NixlReader(self._secret, max_peers=self._max_peers)
        return self._nixl

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError("the KV importer is closed")

    def _parse_handle(self, raw: bytes) -> PoolHandle:
        handle = self._handles.get(raw)
        if handle is None:
            handle = decode_handle(raw)
            self._handles[raw] = handle
            while len(self._handles) > 4 * self._max_peers:
                self._handles.popitem(last=False)
        return handle

    def _peer(self, handle: PoolHandle) -> _Peer:
        if handle.pid == os.getpid():
            local = lookup_local(handle.pool_id)
            if local is not None:
                return _Peer(handle, local)
        peer = self._peers.get(handle.pool_id)
        if peer is not None:
            self._peers.move_to_end(handle.pool_id)
            return peer
        if handle.kind == "nixl":
            raise KVTransferError(
                f"peer KV pool {handle.pool_id} is on another node: it is read through NIXL, not mapped"
            )
        if handle.kind == "local":
            raise KVTransferError(
                f"peer KV pool {handle.pool_id} (pid {handle.pid}) is not shareable or is closed; "
                "the prefill worker must allocate its pool with shareable=True"
            )
        self._prune()
        tensor = attach_shm(handle) if handle.kind == "shm" else open_cuda(handle)
        peer = _Peer(handle, tensor)
        self._peers[handle.pool_id] = peer
        while len(self._peers) > self._max_peers:
            _, old = self._peers.popitem(last=False)
            log.info("unmapping least recently used peer KV pool %s", old.handle.pool_id)
        log.debug("mapped peer KV pool %s (%s, pid %d)", handle.pool_id, handle.kind, handle.pid)
        return peer

    def _prune(self) -> None:
        gone = [
            pid_
            for pid_, p in self._peers.items()
            if p.handle.kind == "shm" and not segment_exists(p.handle.shm_name)
        ]
        for pool_id in gone:
            log.info("unmapping peer KV pool %s: its segment was unlinked", pool_id)
            del self._peers[pool_id]
