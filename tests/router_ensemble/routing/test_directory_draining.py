"""`WorkerDirectory(..., draining=...)`: workers the planner marks draining leave every
selection at once, without waiting for a re-scan, and come back when unmarked; `is_gone`
still answers whether a worker is ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from trident.core.draining import DrainMarkers, clear_draining, mark_draining
from trident.core.errors import WorkerUnavailable


def selectable(directory: WorkerDirectory) -> tuple[str, ...]:
    """What a selector may choose from: the ready workers that are not draining."""
    return tuple(directory.selectable(directory.workers()))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Server:
    """The worker models the server has loaded, answering the directory's readiness probe."""

    def __init__(self, *ready: str) -> None:
        self.ready = set(ready)
        self.probes = 0

    def __call__(self, name: str) -> bool:
        self.probes += 1
        return name in self.ready


def probed(server: Server, marked: set[str], clock: Clock | None = None) -> WorkerDirectory:
    return WorkerDirectory("decode", probe=server, refresh_s=60.0, max_gap=2, clock=clock or Clock(),
                           draining=lambda: marked)


def test_fixed_directory_leaves_a_draining_worker_out_at_once() -> None:
    marked: set[str] = set()
    directory = WorkerDirectory("decode", fixed=("decode", "decode_1", "decode_2"), draining=lambda: marked)
    assert selectable(directory) == ("decode", "decode_1", "decode_2")
    marked.add("decode_1")
    assert selectable(directory) == ("decode", "decode_2")
    marked.discard("decode_1")
    assert selectable(directory) == ("decode", "decode_1", "decode_2")


def test_probed_directory_leaves_a_draining_worker_out_without_a_rescan() -> None:
    server, marked = Server("decode", "decode_1", "decode_2"), set()
    directory = probed(server, marked)
    assert selectable(directory) == ("decode", "decode_1", "decode_2")
    probes = server.probes
    marked.add("decode_2")
    assert selectable(directory) == ("decode", "decode_1")  # the ready list is still cached
    marked.clear()
    assert selectable(directory) == ("decode", "decode_1", "decode_2")
    assert server.probes == probes


def test_markers_of_workers_the_pool_does_not_have_change_nothing() -> None:
    directory = WorkerDirectory("decode", fixed=("decode", "decode_1"), draining=lambda: {"prefill", "decode_7"})
    assert selectable(directory) == ("decode", "decode_1")


def test_every_worker_draining_leaves_none() -> None:
    directory = WorkerDirectory("decode", fixed=("decode", "decode_1"), draining=lambda: {"decode", "decode_1"})
    assert selectable(directory) == ()
    with pytest.raises(WorkerUnavailable, match="no decode worker is ready"):
        RoundRobinSelector(directory).select("r", [1, 2])


def test_without_a_draining_source_nothing_is_left_out() -> None:
    assert selectable(WorkerDirectory("decode", fixed=("decode", "decode_1"))) == ("decode", "decode_1")


def test_round_robin_never_picks_a_draining_worker() -> None:
    server, marked = Server("decode", "decode_1", "decode_2"), set()
    selector = RoundRobinSelector(probed(server, marked))
    assert {selector.select(f"a{i}", [1]).worker for i in range(6)} == {"decode", "decode_1", "decode_2"}
    marked.add("decode_1")
    picked = [selector.select(f"b{i}", [1]).worker for i in range(9)]
    assert "decode_1" not in picked and set(picked) == {"decode", "decode_2"}
    marked.clear()
    assert "decode_1" in {selector.select(f"c{i}", [1]).worker for i in range(3)}


def test_round_robin_with_exclude_and_draining() -> None:
    marked = {"decode"}
    selector = RoundRobinSelector(WorkerDirectory("decode", fixed=("decode", "decode_1", "decode_2"),
                                                  draining=lambda: marked))
    assert {selector.select(f"r{i}", [1], exclude=("decode_1",)).worker for i in range(4)} == {"decode_2"}
    with pytest.raises(WorkerUnavailable, match="ready and free"):
        selector.select("r", [1], exclude=("decode_2", "decode_1"))


def test_drain_markers_on_disk_reach_the_selection(tmp_path: Path) -> None:
    clock = Clock()
    directory = WorkerDirectory("decode", fixed=("decode", "decode_1"),
                                draining=DrainMarkers(tmp_path, check_s=0.2, clock=clock))
    assert selectable(directory) == ("decode", "decode_1")
    mark_draining(tmp_path, "decode_1")
    clock.now = 0.2
    assert selectable(directory) == ("decode",)
    clear_draining(tmp_path, "decode_1")
    clock.now = 0.4
    assert selectable(directory) == ("decode", "decode_1")


def test_refresh_still_rescans_with_draining_workers() -> None:
    clock = Clock()
    server, marked = Server("decode", "decode_1"), {"decode_1"}
    directory = probed(server, marked, clock)
    assert selectable(directory) == ("decode",)
    server.ready.add("decode_2")
    clock.now = 60.0
    directory.refresh()
    assert selectable(directory) == ("decode", "decode_2")


# ---- is_gone ------------------------------------------------------------------------------
def test_is_gone_rescans_a_probed_directory_at_once() -> None:
    server = Server("decode", "decode_1")
    directory = probed(server, set())
    assert selectable(directory) == ("decode", "decode_1")
    assert directory.is_gone("decode_1") is False
    server.ready.discard("decode_1")
    assert selectable(directory) == ("decode", "decode_1")  # cached: refresh_s has not passed
    assert directory.is_gone("decode_1") is True  # a failed call re-checks now
    assert selectable(directory) == ("decode",)
    assert directory.is_gone("decode_9") is True


def test_is_gone_of_a_fixed_directory_is_membership() -> None:
    selector = RoundRobinSelector(WorkerDirectory("decode", fixed=("decode", "decode_1"), draining=lambda: set()))
    assert selector.is_gone("decode") is False and selector.is_gone("decode_1") is False
    assert selector.is_gone("decode_2") is True


def test_is_gone_of_a_ready_worker_is_unchanged_by_another_workers_marker() -> None:
    server = Server("decode", "decode_1")
    directory = probed(server, {"decode"})
    assert directory.is_gone("decode_1") is False
    server.ready.discard("decode_1")
    assert directory.is_gone("decode_1") is True


def test_a_draining_worker_stays_ready_for_the_requests_it_holds() -> None:
    """Marking a worker draining keeps it in `workers()` (its streams and KV-event
    subscription go on) and out of every selection."""
    marked: set[str] = set()
    directory = WorkerDirectory("decode", fixed=("decode", "decode_1"), draining=lambda: frozenset(marked))
    marked.add("decode_1")
    assert directory.workers() == ("decode", "decode_1")
    assert selectable(directory) == ("decode",)
    assert not directory.is_gone("decode_1")
