"""Leases: blocks a prefill worker keeps pinned until a decode worker has copied them.

A lease ends when the decode side releases it or when it expires. The descriptor carries the
wall-clock `lease_expiry`; the importer refuses to open a lease past it and fails a pull that
finishes past it. The exporter frees an expired lease only `EXPIRY_GRACE_S` later, so a copy
that finished before the expiry can never have raced with the blocks being reused.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPIRY_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    request_id: str
    block_ids: tuple[int, ...]
    deadline: float  # time.monotonic() after which the exporter frees the blocks


class LeaseTable:
    """The live leases of one exporter, in deadline order.

    Owned by `KVExporterImpl` and used on the engine loop thread only. Every lease gets the
    same TTL, so insertion order is deadline order and expiry stops at the first live lease.
    A block may sit in several leases (two requests sharing a cached prefix); each lease
    gives its own block list back, and the engine drops one reference per list.
    """

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._held = 0

    def add(self, lease: Lease) -> None:
        if lease.lease_id in self._leases:
            raise KeyError(f"lease {lease.lease_id} exists")
        self._leases[lease.lease_id] = lease
        self._held += len(lease.block_ids)

    def release(self, lease_id: str) -> Lease | None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._held -= len(lease.block_ids)
        return lease

    def release_request(self, request_id: str) -> list[Lease]:
        """End every lease taken for `request_id` (normally one)."""
        mine = [lease for lease in self._leases.values() if lease.request_id == request_id]
        for lease in mine:
            self.release(lease.lease_id)
        return mine

    def expire(self, now: float) -> list[Lease]:
        expired: list[Lease] = []
        for lease in self._leases.values():
            if lease.deadline > now:
                break
            expired.append(lease)
        for lease in expired:
            self.release(lease.lease_id)
        return expired

    def clear(self) -> list[Lease]:
        leases = list(self._leases.values())
        self._leases.clear()
        self._held = 0
        return leases

    def held_blocks(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases
