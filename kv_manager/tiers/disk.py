"""Disk KV tier: one file per block under `<root>/<layout fingerprint>/`, admitted by reuse,
capped in size (least recently used evicted), and still there after a restart.

A block file is a header, the block's token ids and its bytes:

    magic "TKVB" | version u16 | fingerprint 16 ascii | hash u64 | parent u64 | has_parent u8
    | tokens u32 | payload bytes u64 | XXH3-128 of tokens and payload | tokens (u32 each) | payload

Files are written to a temporary name and renamed into place by `complete_store`, so a
crashed or failed store leaves nothing another reader can see. At start the tier indexes the
files of its fingerprint (oldest first, by modification time) from their headers; `read`
verifies the checksum, and a file that is corrupt, truncated or of another layout is
deleted with a warning and never loaded (the caller recomputes). A full disk makes stores
fail (the caller completes them with `ok=False`): no offload, no error to the request.

Admission: a block is written only when it has been offered `admit_after` times (KVBM's
reuse-frequency admission: a block seen once is not worth a disk write). The tier owns its
directory; `announce()` gives the `BlockStored` events of everything held, for a restarted
worker to tell the router what its disk holds.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from kv_manager.events import BlockRemoved, KVEvent
from kv_manager.layout import KVLayout
from kv_manager.tiers.base import BlockKey, IndexedTier, LoadJob, StoreJob, TierError
from kv_manager.tiers.host import stored_events
from kv_manager.transfer.local_pool import torch_dtype

logger = logging.getLogger(__name__)

MEDIUM = "DISK"
MAGIC = b"TKVB"
VERSION = 2
_HEADER = struct.Struct("<4sH16sQQBIQ16s")


@dataclass(slots=True)
class _Entry:
    key: BlockKey
    path: Path
    nbytes: int


class DiskTier(IndexedTier):
    """See the module docstring and `kv_manager.tiers.base`."""

    medium = MEDIUM

    def __init__(self, layout: KVLayout, root: str | os.PathLike, capacity_bytes: int, *, admit_after: int = 2) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise TierError(f"disk tier: capacity must be positive, got {capacity_bytes}")
        self.layout = layout
        self.fingerprint = layout.fingerprint()
        self.dir = Path(root) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.capacity_bytes = capacity_bytes
        self.admit_after = max(1, admit_after)
        self._offers: defaultdict[int, int] = defaultdict(int)
        self._used = 0
        self.stats.update(dropped=0, failed_stores=0)
        self._scan()

    # -- restart -------------------------------------------------------------------------
    def _scan(self) -> None:
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a store that never completed
        files = sorted(self.dir.glob("*.kvb"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                key, nbytes = self._read_header(path)
            except TierError as exc:
                logger.warning("disk tier: dropping %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                self.stats["dropped"] += 1
                continue
            self._index[key.block_hash] = _Entry(key, path, path.stat().st_size)
            self._used += path.stat().st_size
        self._evict_to(self.capacity_bytes)
        if self._index:
            logger.info("disk tier: %d blocks (%.1f MiB) from %s", len(self._index), self._used / 2**20, self.dir)

    def announce(self) -> list[KVEvent]:
        """`BlockStored` events for every block held (a restarted worker publishes them)."""
        with self._lock:
            keys = [e.key for e in self._index.values()]
        return list(stored_events(_parents_first(keys), self.layout.block_size, MEDIUM))

    # -- store ---------------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[BlockKey]) -> StoreJob:
        with self._lock:
            admitted = []
            for key in keys:
                if key.block_hash in self._index:
                    continue
                self._offers[key.block_hash] += 1
                if self._offers[key.block_hash] >= self.admit_after:
                    admitted.append(key)
            job = StoreJob(admitted)
            job.slots = [self.dir / f"{k.block_hash:016x}.{os.getpid()}.{id(job):x}.tmp" for k in admitted]
            return job

    def write(self, job: StoreJob, i: int, block: torch.Tensor) -> None:
        key, tmp = job.keys[i], job.slots[i]
        payload = memoryview(block.detach().to("cpu").contiguous().view(torch.uint8).numpy()).cast("B")
        tokens = struct.pack(f"<{len(key.token_ids)}I", *key.token_ids)
        digest = xxhash.xxh3_128(tokens)
        digest.update(payload)
        header = _HEADER.pack(MAGIC, VERSION, self.fingerprint.encode("ascii"), key.block_hash,
                              key.parent_hash or 0, key.parent_hash is not None, len(key.token_ids),
                              len(payload), digest.digest())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                parts = [header, tokens, payload]
                while parts:  # writev may write less than asked
                    n = os.writev(fd, parts)
                    parts = _advance(parts, n)
            finally:
                os.close(fd)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise TierError(f"disk tier: cannot write block {key.block_hash:#x}: {exc}") from exc

    def complete_store(self, job: StoreJob, ok: bool) -> None:
        if job.done:
            return
        job.done = True
        if not ok:
            for tmp in job.slots:
                Path(tmp).unlink(missing_ok=True)
            with self._lock:
                self.stats["failed_stores"] += 1
            return
        with self._lock:
            stored = []
            for key, tmp in zip(job.keys, job.slots, strict=True):
                path = self.dir / f"{key.block_hash:016x}.kvb"
                os.replace(tmp, path)
                size = path.stat().st_size
                self._index[key.block_hash] = _Entry(key, path, size)
                self._used += size
                self._offers.pop(key.block_hash, None)
                stored.append(key)
            self.stats["stored"] += len(stored)
            self._events.extend(stored_events(stored, self.layout.block_size, MEDIUM))
            self._evict_to(self.capacity_bytes)

    # -- load ----------------------------------------------------------------------------
    def read(self, job: LoadJob, i: int, out: torch.Tensor) -> None:
        h, path = job.hashes[i], job.slots[i]
        try:
            with open(path, "rb", buffering=0) as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
            offset = self._check(memoryview(data), h)
        except (OSError, TierError) as exc:
            self._drop(h, str(exc))
            raise TierError(f"disk tier: block {h:#x} unreadable ({exc}); dropped") from exc
        block = torch.frombuffer(data, dtype=torch_dtype(self.layout), offset=offset).view(self.layout.block_shape)
        out.copy_(block)

    def _after_load(self) -> None:
        self._evict_to(self.capacity_bytes)  # what pins kept over the cap goes now

    def _slot(self, record: object) -> object:
        return record.path  # type: ignore[attr-defined]

    # -- files ---------------------------------------------------------------------------
    def _read_header(self, path: Path) -> tuple[BlockKey, int]:
        with open(path, "rb") as f:
            raw = f.read(_HEADER.size)
            if len(raw) < _HEADER.size:
                raise TierError("truncated header")
            magic, version, fp, h, parent, has_parent, ntok, nbytes, _ = _HEADER.unpack(raw)
            if magic != MAGIC or version != VERSION:
                raise TierError("not a block file of this version")
            if fp.decode("ascii", "replace") != self.fingerprint:
                raise TierError(f"layout fingerprint {fp!r}, this worker's is {self.fingerprint}")
            if nbytes != self.layout.block_nbytes:
                raise TierError(f"{nbytes} payload bytes, a block has {self.layout.block_nbytes}")
            tokens = f.read(4 * ntok)
            if len(tokens) < 4 * ntok:
                raise TierError("truncated tokens")
        token_ids = struct.unpack(f"<{ntok}I", tokens)
        return BlockKey(h, parent if has_parent else None, tuple(token_ids)), nbytes

    def _check(self, data: memoryview, expected_hash: int) -> int:
        """Where the payload starts in a whole block file, or `TierError`."""
        if len(data) < _HEADER.size:
            raise TierError("truncated header")
        magic, version, fp, h, _, _, ntok, nbytes, digest = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or fp.decode("ascii", "replace") != self.fingerprint:
            raise TierError("not a block file of this layout")
        if h != expected_hash:
            raise TierError(f"holds block {h:#x}")
        body = data[_HEADER.size:]
        if len(body) != 4 * ntok + nbytes or nbytes != self.layout.block_nbytes:
            raise TierError(f"truncated: {len(body)} bytes after the header, expected {4 * ntok + nbytes}")
        if xxhash.xxh3_128_digest(body) != digest:
            raise TierError("checksum mismatch")
        return _HEADER.size + 4 * ntok

    def _drop(self, h: int, why: str) -> None:
        logger.warning("disk tier: dropping block %#x: %s", h, why)
        with self._lock:
            entry = self._index.pop(h, None)
            if entry is not None:
                self._used -= entry.nbytes
                entry.path.unlink(missing_ok=True)
                self._events.append(BlockRemoved((h,), MEDIUM))
                self.stats["dropped"] += 1

    def _evict_to(self, limit: int) -> None:
        for h in [h for h in self._index if h not in self._pins]:
            if self._used <= limit:
                return
            entry = self._index.pop(h)
            self._used -= entry.nbytes
            entry.path.unlink(missing_ok=True)
            self._events.append(BlockRemoved((h,), MEDIUM))
            self.stats["evicted"] += 1

    @property
    def used_bytes(self) -> int:
        return self._used


def _advance(parts: list, n: int) -> list:
    """What is left of `parts` (buffers) after the first `n` bytes were written."""
    out = []
    for part in parts:
        if n >= len(part):
            n -= len(part)
            continue
        out.append(memoryview(part)[n:] if n else part)
        n = 0
    return out


def _parents_first(keys: list[BlockKey]) -> list[BlockKey]:
    """`keys` ordered so that each chain runs from its first held block down (one event per
    chain, however the files' times interleave)."""
    held = {k.block_hash for k in keys}
    children: defaultdict[int | None, list[BlockKey]] = defaultdict(list)
    for k in keys:
        children[k.parent_hash if k.parent_hash in held else None].append(k)
    out: list[BlockKey] = []
    stack = list(reversed(children[None]))
    while stack:
        k = stack.pop()
        out.append(k)
        stack.extend(reversed(children.get(k.block_hash, [])))
    return out
