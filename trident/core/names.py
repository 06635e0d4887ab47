"""Names every component agrees on: worker replicas, model-control key header.

A worker pool is a template model (`decode`, `prefill`) plus replicas loaded from it at run
time: replica 0 is the template's own name, replica i is `<pool>_<i>`. The launcher and the
planner create them (`replica_name`), the router discovers them (`replica_name` again), the
frontend's health probe recognises them (`parse_replica`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

WORKER_POOLS = ("decode", "prefill")
# Header of the key that unlocks Triton's restricted model-repository API (HTTP; gRPC
# prefixes it with `triton-grpc-protocol-`). The launcher and the planner hold the key.
ADMIN_KEY_HEADER = "trident-admin-key"
ADMIN_KEY_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"

_REPLICA = re.compile(r"^(?P<pool>[A-Za-z][A-Za-z0-9-]*?)(?:_(?P<index>[1-9][0-9]*))?$")


def replica_name(pool: str, index: int) -> str:
    """`decode` for index 0, `decode_3` for index 3."""
    if index < 0:
        raise ValueError(f"replica index must be >= 0, got {index}")
    return pool if index == 0 else f"{pool}_{index}"


def replica_names(pool: str, count: int) -> list[str]:
    """The first `count` replicas of a pool, in index order."""
    return [replica_name(pool, i) for i in range(count)]


def scan_replicas(pool: str, is_ready: Callable[[str], bool], max_gap: int = 4) -> tuple[str, ...]:
    """The ready replicas of `pool`, probing `pool`, `pool_1`, ... until `max_gap` names in
    a row are not ready. Triton's repository index lists only models with a directory (the
    templates), so replicas created by override are found by name: the router's
    `WorkerDirectory` and the planner's Triton connector both scan this way."""
    found = []
    gap = 0
    for i in itertools.count(0):
        name = replica_name(pool, i)
        if is_ready(name):
            found.append(name)
            gap = 0
        else:
            gap += 1
            if gap >= max_gap:
                break
    return tuple(found)


def parse_replica(name: str) -> tuple[str, int] | None:
    """(pool, index) of a replica name, or None when it is not one."""
    match = _REPLICA.match(name)
    if match is None:
        return None
    return match["pool"], int(match["index"] or 0)


def is_worker_model(name: str, pools: tuple[str, ...] = WORKER_POOLS) -> bool:
    parsed = parse_replica(name)
    return parsed is not None and parsed[0] in pools
