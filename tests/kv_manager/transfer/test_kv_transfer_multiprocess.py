"""KV transfer between real processes: a spawned prefill process owns the pool and leases;
this process (or a spawned decode process) imports, pulls and releases."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from kv_peer import LAYOUT_ARGS, block_bytes, decode_open_then_hang, prefill_main

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVImporterImpl, decode_descriptor
from trident.core.errors import KVTransferError

torch.set_num_threads(1)

NUM_BLOCKS = 64
LAYOUT = KVLayout(*LAYOUT_ARGS)
HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
CTX = mp.get_context("spawn")


class Peer:
    """The test's end of a prefill process."""

    def __init__(self, device: str, num_blocks: int = NUM_BLOCKS) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=prefill_main, args=(child, LAYOUT_ARGS, num_blocks, device, 1234), daemon=True
        )
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.shm_name = ""

    def wait_ready(self) -> Peer:
        if not self.conn.poll(60):
            raise RuntimeError("prefill peer did not start")
        _, self.pid, self.shm_name = self.conn.recv()
        return self

    def call(self, *cmd):
        self.conn.send(cmd)
        if not self.conn.poll(30):
            raise RuntimeError(f"prefill peer did not answer {cmd[0]}")
        return self.conn.recv()

    def export(self, which: str, ids: list[int], num_tokens: int | None = None) -> bytes:
        n = num_tokens if num_tokens is not None else len(ids) * LAYOUT.block_size
        return self.call("export", which, ids, n, list(range(1, n // LAYOUT.block_size + 1)))

    def wait_released(self, which: str, timeout: float = 10.0) -> list[list[int]]:
        freed: list[list[int]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            freed += self.call("poll", which)
            if self.call("held", which) == 0:
                return freed
            time.sleep(0.05)
        raise AssertionError(f"{which} leases still hold {self.call('held', which)} blocks")

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close")
            except (RuntimeError, OSError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module", params=DEVICES)
def peer(request):
    p = Peer(request.param).wait_ready()
    p.device = request.param
    yield p
    p.stop()


@pytest.fixture
def importer():
    imp = KVImporterImpl(LAYOUT, copy_threads=2)
    yield imp
    imp.close()


def test_pull_scattered_blocks_is_byte_exact(peer, importer):
    src = [17, 3, 40, 41, 42, 9, 63, 0]
    dst_ids = [5, 6, 7, 1, 2, 30, 12, 31]
    desc = importer.open(peer.export("long", src, num_tokens=len(src) * 4 - 1))
    dst = torch.zeros(LAYOUT.pool_shape(32), dtype=torch.bfloat16, device=peer.device)
    importer.pull(desc, dst, dst_ids)
    assert block_bytes(dst, dst_ids) == peer.call("blocks", src)
    untouched = [i for i in range(32) if i not in dst_ids]
    assert not dst[untouched].any()
    importer.release(desc)
    assert peer.wait_released("long") == [src]


def test_pool_is_mapped_once_per_peer(peer, importer):
    descs = [importer.open(peer.export("long", [i, i + 1])) for i in (0, 10, 20)]
    assert len(importer._peers) == 1
    dst = torch.zeros(LAYOUT.pool_shape(8), dtype=torch.bfloat16, device=peer.device)
    for desc in descs:
        importer.pull(desc, dst, [0, 1])
        assert block_bytes(dst, [0, 1]) == peer.call("blocks", list(desc.block_ids))
        importer.release(desc)
    peer.wait_released("long")


def test_cpu_peer_pool_is_read_only_and_0600(peer, importer):
    if peer.device != "cpu":
        pytest.skip("shared memory only backs CPU pools")
    path = f"/dev/shm/{peer.shm_name}"
    assert peer.shm_name.startswith(f"trident_kv_{peer.pid}_")
    assert os.stat(path).st_mode & 0o777 == 0o600
    desc = importer.open(peer.export("long", [1]))
    mapped = importer.peer_pool(desc)
    assert mapped.shape == LAYOUT.pool_shape(NUM_BLOCKS)
    importer.release(desc)
    peer.wait_released("long")


def test_mismatched_layout_is_refused_naming_both(peer):
    other = KVLayout(2, 2, 8, 16, "bfloat16", "tiny-test-model")
    imp = KVImporterImpl(other)
    try:
        raw = peer.export("long", [1, 2])
        with pytest.raises(KVTransferError) as err:
            imp.open(raw)
        msg = str(err.value)
        assert "mismatch" in msg and "block_size=4" in msg and "block_size=16" in msg
        assert "prefill-long" in msg
        assert not imp._peers  # refused before anything was mapped
    finally:
        imp.close()
    cleanup = KVImporterImpl(LAYOUT)
    cleanup.release(decode_descriptor(raw))  # a refused lease is still the caller's to end
    cleanup.close()
    assert peer.wait_released("long") == [[1, 2]]


def test_unpulled_lease_expires_and_frees_its_blocks(peer):
    raw = peer.export("short", [4, 5, 6])
    assert peer.call("held", "short") == 3
    freed = peer.wait_released("short")
    assert freed == [[4, 5, 6]]
    imp = KVImporterImpl(LAYOUT)
    try:
        with pytest.raises(KVTransferError, match="expired"):
            imp.open(raw)
    finally:
        imp.close()


def test_killed_decode_leaves_no_stranded_blocks(peer):
    conn, child = CTX.Pipe()
    proc = CTX.Process(
        target=decode_open_then_hang, args=(child, LAYOUT_ARGS, peer.device), daemon=True
    )
    proc.start()
    child.close()
    try:
        assert conn.poll(60) and conn.recv() == "started"
        conn.send(peer.export("short", [7, 8]))
        assert conn.poll(60) and conn.recv() == "opened"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        assert peer.wait_released("short") == [[7, 8]]
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def test_prefill_segments_are_unlinked_on_close_and_on_plain_exit():
    closing, exiting = Peer("cpu", num_blocks=8), Peer("cpu", num_blocks=8)
    try:
        closing.wait_ready()
        exiting.wait_ready()
        raw = closing.export("long", [1])
        for p in (closing, exiting):
            assert os.path.exists(f"/dev/shm/{p.shm_name}")
        assert closing.call("close") == "closed"
        assert exiting.call("exit") == "exiting"  # returns without closing: the safety net
        for p in (closing, exiting):
            p.proc.join(10)
            assert p.proc.exitcode == 0
            assert not glob.glob(f"/dev/shm/trident_kv_{p.pid}_*")
        imp = KVImporterImpl(LAYOUT)
        try:
            with pytest.raises(KVTransferError, match="gone"):
                imp.open(raw)
        finally:
            imp.close()
    finally:
        closing.stop()
        exiting.stop()
