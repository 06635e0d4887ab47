"""Drain markers (`trident.core.draining`): the files the planner writes in the server's run
directory, and the router's cached view of them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trident.core.draining import (
    SUFFIX,
    DrainMarkers,
    clear_draining,
    draining_workers,
    mark_draining,
    marker_path,
)
from trident.core.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_mark_creates_a_private_marker_file(tmp_path: Path) -> None:
    mark_draining(tmp_path, "decode_1")
    path = tmp_path / "decode_1.draining"
    assert marker_path(tmp_path, "decode_1") == path and SUFFIX == ".draining"
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert draining_workers(tmp_path) == {"decode_1"}


def test_mark_and_clear_are_idempotent(tmp_path: Path) -> None:
    mark_draining(tmp_path, "decode_2")
    mark_draining(tmp_path, "decode_2")
    assert draining_workers(tmp_path) == {"decode_2"}
    clear_draining(tmp_path, "decode_2")
    clear_draining(tmp_path, "decode_2")
    assert draining_workers(tmp_path) == frozenset()
    clear_draining(tmp_path, "never_marked")


def test_draining_workers_lists_only_markers(tmp_path: Path) -> None:
    for worker in ("decode_1", "prefill", "decode.v2"):
        mark_draining(tmp_path, worker)
    (tmp_path / "decode.ipc").write_text("")  # a worker's KV event socket lives here too
    (tmp_path / "decode_1.draining.tmp").write_text("")
    assert draining_workers(tmp_path) == {"decode_1", "prefill", "decode.v2"}


def test_draining_workers_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert draining_workers(tmp_path / "no-such-dir") == frozenset()


@pytest.mark.parametrize("worker", ["", "../decode", "a/b", "decode 1", "decode\n"])
def test_invalid_worker_names_are_config_errors(tmp_path: Path, worker: str) -> None:
    with pytest.raises(ConfigError, match="^worker: .* is not a valid model name"):
        mark_draining(tmp_path, worker)
    with pytest.raises(ConfigError):
        clear_draining(tmp_path, worker)
    with pytest.raises(ConfigError):
        marker_path(tmp_path, worker)
    assert list(tmp_path.iterdir()) == []


def test_markers_are_cached_until_check_s_has_passed(tmp_path: Path) -> None:
    clock = Clock()
    markers = DrainMarkers(tmp_path, check_s=0.2, clock=clock)
    assert markers() == frozenset()  # the first call reads the directory
    mark_draining(tmp_path, "decode_1")
    clock.now = 0.1
    assert markers() == frozenset()  # cached
    clock.now = 0.2
    assert markers() == {"decode_1"}
    clear_draining(tmp_path, "decode_1")
    clock.now = 0.39
    assert markers() == {"decode_1"}  # still cached
    clock.now = 0.4
    assert markers() == frozenset()


def test_markers_of_a_directory_created_later(tmp_path: Path) -> None:
    clock = Clock()
    run_dir = tmp_path / "server-1"
    markers = DrainMarkers(run_dir, check_s=1.0, clock=clock)
    assert markers() == frozenset()
    run_dir.mkdir()
    mark_draining(run_dir, "decode")
    clock.now = 1.0
    assert markers() == {"decode"}
