"""The prefill side of a KV handoff: pin blocks under a lease, hand out a descriptor, and
learn when the decode side is done with them.

Release notifications arrive on a ZMQ PULL socket bound to `ipc://` inside a private 0700
temporary directory (only this user can connect), or to a random TCP port on 127.0.0.1 (on
the node's configured address, `release_host`, when decode workers on other nodes release).
Each message is a lease id; lease ids are 128 random bits, so only a holder of the
descriptor can end a lease early.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence

import torch
import zmq

from kv_manager.layout import KVLayout
from kv_manager.transfer.base import KVDescriptor, KVPoolMemory
from kv_manager.transfer.descriptor import encode_descriptor
from kv_manager.transfer.lease import EXPIRY_GRACE_S, Lease, LeaseTable
from trident.core.errors import ConfigError, KVTransferError

log = logging.getLogger(__name__)

_MAX_MESSAGES_PER_POLL = 4096
_MAX_IPC_PATH = 100
_U64 = 1 << 64  # sun_path holds 107 bytes


class KVExporterImpl:
    """Pins a finished prefill's prompt blocks under leases until decode releases them.

    Built by the prefill engine at start, next to its shareable pool; every method runs on the
    engine loop thread. `export()` moves the ownership of the given blocks to a lease (the
    engine must not free or reuse them); `poll_released()`, called every engine step, hands
    the blocks of released or expired leases back to the engine, which frees them. `close()`
    (idempotent) drops every lease and the socket; the pool itself stays the engine's.
    """

    def __init__(
        self,
        memory: KVPoolMemory,
        layout: KVLayout,
        worker_id: str,
        lease_ttl_s: float = 30.0,
        *,
        transport: str = "ipc",
        release_host: str = "127.0.0.1",
        expiry_grace_s: float = EXPIRY_GRACE_S,
    ) -> None:
        if memory.layout.fingerprint() != layout.fingerprint():
            raise ConfigError(
                f"kv layout: pool has {memory.layout.describe()}, exporter got {layout.describe()}"
            )
        if not lease_ttl_s > 0:
            raise ConfigError(f"lease_ttl_s: must be positive, got {lease_ttl_s!r}")
        if not expiry_grace_s >= 0:
            raise ConfigError(f"expiry_grace_s: must be >= 0, got {expiry_grace_s!r}")
        if transport not in ("ipc", "tcp"):
            raise ConfigError(f"kv_release_transport: 'ipc' or 'tcp', got {transport!r}")
        self.layout = layout
        self.worker_id = worker_id
        self.lease_ttl_s = float(lease_ttl_s)
        self.expiry_grace_s = float(expiry_grace_s)
        self._memory = memory
        self._pool_handle = memory.handle()
        self._fingerprint = layout.fingerprint()
        self._leases = LeaseTable()
        self._closed = False
        self._dir_finalizer: weakref.finalize | None = None
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self.release_addr = self._bind(transport, release_host)
        except BaseException:
            self.close()
            raise
        log.debug("worker=%s: KV lease releases on %s", worker_id, self.release_addr)

    def _bind(self, transport: str, host: str) -> str:
        if transport == "ipc":
            tmp = tempfile.mkdtemp(prefix="trident_kvrel_")  # mode 0700
            # Removed by close(), or when this object is collected or the interpreter exits.
            self._dir_finalizer = weakref.finalize(self, shutil.rmtree, tmp, True)
            path = os.path.join(tmp, "release")
            if len(path) <= _MAX_IPC_PATH:
                addr = f"ipc://{path}"
                self._sock.bind(addr)
                return addr
            log.warning("temp dir path too long for an ipc socket (%s); using tcp", path)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    def export(
        self, request_id: str, block_ids: list[int], num_tokens: int, block_hashes: list[int]
    ) -> bytes:
        """Pin `block_ids` (the prompt's blocks, in order) under a new lease; descriptor bytes."""
        if self._closed:
            raise KVTransferError(f"request_id={request_id}: the KV exporter is closed")
        ids = self._check_export(request_id, block_ids, num_tokens, block_hashes)
        tensor = self._memory.tensor
        if tensor.is_cuda:
            # The descriptor may reach a peer before this stream's KV writes land otherwise.
            torch.cuda.current_stream(tensor.device).synchronize()
        lease_id = secrets.token_hex(16)
        expiry = time.time() + self.lease_ttl_s
        deadline = time.monotonic() + self.lease_ttl_s + self.expiry_grace_s
        self._leases.add(Lease(lease_id, request_id, ids, deadline))
        desc = KVDescriptor(
            worker_id=self.worker_id,
            pool_handle=self._pool_handle,
            fingerprint=self._fingerprint,
            block_ids=ids,
            num_tokens=num_tokens,
            block_hashes=tuple(block_hashes),
            lease_id=lease_id,
            lease_expiry=expiry,
            release_addr=self.release_addr,
        )
        log.debug(
            "worker=%s request_id=%s: leased %d blocks as %s",
            self.worker_id,
            request_id,
            len(ids),
            lease_id,
        )
        return encode_descriptor(desc)

    def _check_export(
        self,
        request_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        block_hashes: Sequence[int],
    ) -> tuple[int, ...]:
        ids = tuple(block_ids)
        n = self._memory.num_blocks
        if not ids:
            raise KVTransferError(f"request_id={request_id}: block_ids is empty")
        for b in ids:
            if not isinstance(b, int) or not 0 <= b < n:
                raise KVTransferError(f"request_id={request_id}: block_ids: {b!r} not in [0, {n})")
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise KVTransferError(
                f"request_id={request_id}: num_tokens must be positive, got {num_tokens!r}"
            )
        if len(ids) * self.layout.block_size < num_tokens:
            raise KVTransferError(
                f"request_id={request_id}: num_tokens: {num_tokens} tokens do not fit in "
                f"{len(ids)} blocks of {self.layout.block_size}"
            )
        if len(block_hashes) > len(ids):
            raise KVTransferError(
                f"request_id={request_id}: block_hashes: {len(block_hashes)} hashes for {len(ids)} blocks"
            )
        for h in block_hashes:
            if not isinstance(h, int) or not 0 <= h < _U64:
                raise KVTransferError(f"request_id={request_id}: block_hashes: {h!r} is not a u64")
        return ids

    def poll_released(self) -> list[list[int]]:
        """Block-id lists of leases released by decode or expired since the last call.

        Non-blocking; the engine frees each list (one reference per block) right away.
        """
        if self._closed:
            return []
        freed: list[list[int]] = []
        for _ in range(_MAX_MESSAGES_PER_POLL):
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            lease = self._leases.release(msg.decode("ascii", "replace"))
            if lease is None:
                log.debug(
                    "worker=%s: release of unknown or already freed lease %r",
                    self.worker_id,
                    msg[:64],
                )
                continue
            freed.append(list(lease.block_ids))
        for lease in self._leases.expire(time.monotonic()):
            log.warning(
                "worker=%s request_id=%s: KV lease %s expired unreleased; freeing %d blocks",
                self.worker_id,
                lease.request_id,
                lease.lease_id,
                len(lease.block_ids),
            )
            freed.append(list(lease.block_ids))
        return freed

    def revoke(self, request_id: str) -> list[list[int]]:
        """End the leases of `request_id` at once, without waiting for a release or expiry;
        block-id lists to free, as `poll_released` gives. Only for a request whose descriptor
        was never handed to a decode worker (the router closed it after the first token:
        a cancel or a stop string), so no pull can be reading those blocks."""
        freed = [list(lease.block_ids) for lease in self._leases.release_request(request_id)]
        if freed:
            log.debug("worker=%s request_id=%s: lease revoked (never handed over)", self.worker_id, request_id)
        return freed

    def held_blocks(self) -> int:
        """Block references pinned by live leases (a block shared by two leases counts twice)."""
        return self._leases.held_blocks()

    def num_leases(self) -> int:
        return len(self._leases)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dropped = self._leases.clear()
        if dropped:
            log.info("worker=%s: closing with %d live KV leases", self.worker_id, len(dropped))
        self._sock.close(linger=0)
        if self._dir_finalizer is not None:
            self._dir_finalizer()
