from __future__ import annotations

import pytest

from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from trident.core.errors import WorkerUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_directory_discovers_replicas_and_refreshes() -> None:
    ready = {"decode", "decode_1", "decode_3"}
    clock = Clock()
    directory = WorkerDirectory("decode", probe=lambda name: name in ready, refresh_s=2.0, max_gap=2, clock=clock)
    assert directory.workers() == ("decode", "decode_1", "decode_3")
    ready.add("decode_2")
    assert directory.workers() == ("decode", "decode_1", "decode_3")  # cached
    clock.now = 2.5
    assert directory.workers() == ("decode", "decode_1", "decode_2", "decode_3")
    ready.discard("decode")
    directory.invalidate()
    assert directory.workers() == ("decode_1", "decode_2", "decode_3")


def test_probe_errors_count_as_not_ready() -> None:
    def probe(name: str) -> bool:
        if name != "decode":
            raise RuntimeError("unknown model")
        return True

    assert WorkerDirectory("decode", probe=probe).workers() == ("decode",)


def test_round_robin_cycles_and_fails_without_workers() -> None:
    selector = RoundRobinSelector(WorkerDirectory("decode", fixed=("decode", "decode_1")))
    assert [selector.select(str(i), [1, 2]).worker for i in range(4)] == ["decode", "decode_1"] * 2
    empty = RoundRobinSelector(WorkerDirectory("decode", probe=lambda name: False))
    with pytest.raises(WorkerUnavailable, match="no decode worker is ready"):
        empty.select("r", [1])


def test_refresh_rescans_only_when_due() -> None:
    ready = {"decode"}
    probes: list[str] = []
    clock = Clock()

    def probe(name: str) -> bool:
        probes.append(name)
        return name in ready

    directory = WorkerDirectory("decode", probe=probe, refresh_s=2.0, max_gap=1, clock=clock)
    assert directory.workers() == ("decode",) and probes == ["decode", "decode_1"]
    ready.add("decode_1")
    directory.refresh()  # not due: no probe
    assert len(probes) == 2
    clock.now = 2.0
    directory.refresh()
    assert len(probes) > 2
    count = len(probes)
    assert directory.workers() == ("decode", "decode_1") and len(probes) == count  # fresh: cached
