"""Leases, the exporter and the importer in one process (real ZMQ sockets, real pools)."""

from __future__ import annotations

import time

import pytest
import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool, decode_descriptor
from kv_manager.transfer.lease import Lease, LeaseTable
from trident.core.errors import ConfigError, KVTransferError

torch.set_num_threads(1)

LAYOUT = KVLayout(2, 2, 8, 4, "bfloat16", "tiny")


@pytest.fixture
def pool():
    p = allocate_pool(LAYOUT, 16, "cpu", shareable=True)
    p.tensor.copy_(torch.randn(p.tensor.shape).to(torch.bfloat16))
    yield p
    p.close()


@pytest.fixture
def importer():
    imp = KVImporterImpl(LAYOUT)
    yield imp
    imp.close()


def _poll_until(exporter: KVExporterImpl, timeout: float = 5.0) -> list[list[int]]:
    freed: list[list[int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and exporter.held_blocks():
        freed += exporter.poll_released()
        time.sleep(0.01)
    return freed


def test_lease_table_expires_in_order_and_counts_shared_blocks():
    table = LeaseTable()
    table.add(Lease("a", "r1", (1, 2), deadline=10.0))
    table.add(Lease("b", "r2", (2, 3, 4), deadline=20.0))
    assert table.held_blocks() == 5 and len(table) == 2
    assert table.expire(5.0) == []
    assert [lease.lease_id for lease in table.expire(15.0)] == ["a"]
    assert table.release("a") is None
    assert table.release("b").block_ids == (2, 3, 4)
    assert table.held_blocks() == 0
    with pytest.raises(KeyError):
        table.add(Lease("c", "r", (1,), 1.0))
        table.add(Lease("c", "r", (1,), 1.0))


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_release_reaches_the_exporter(pool, importer, transport):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0, transport=transport)
    try:
        assert exporter.release_addr.startswith(f"{transport}://")
        raw = exporter.export("r1", [3, 4, 9], 10, [11, 12])
        desc = importer.open(raw)
        assert (desc.worker_id, desc.block_ids, desc.num_tokens, desc.block_hashes) == (
            "p0",
            (3, 4, 9),
            10,
            (11, 12),
        )
        assert exporter.held_blocks() == 3
        dst = torch.zeros(LAYOUT.pool_shape(4), dtype=torch.bfloat16)
        importer.pull(desc, dst, [2, 0, 1])
        assert torch.equal(dst[[2, 0, 1]], pool.tensor[[3, 4, 9]])
        importer.release(desc)
        importer.release(desc)  # a second release is harmless
        assert _poll_until(exporter) == [[3, 4, 9]]
        assert exporter.poll_released() == []
    finally:
        exporter.close()
        exporter.close()


def test_two_leases_on_a_shared_block_each_give_theirs_back(pool, importer):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0)
    try:
        d1 = decode_descriptor(exporter.export("r1", [1, 2], 8, [5, 6]))
        d2 = decode_descriptor(exporter.export("r2", [1, 7], 6, [5]))
        assert exporter.held_blocks() == 4 and exporter.num_leases() == 2
        importer.release(d2)
        importer.release(d1)
        assert sorted(_poll_until(exporter)) == [[1, 2], [1, 7]]
    finally:
        exporter.close()


def test_expired_lease_is_freed_and_refused(pool, importer):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 0.2, expiry_grace_s=0.2)
    try:
        raw = exporter.export("r1", [5], 3, [])
        assert exporter.poll_released() == []  # not yet: ttl plus grace
        time.sleep(0.21)
        with pytest.raises(KVTransferError, match=r"lease .* of worker p0 expired"):
            importer.open(raw)
        assert exporter.held_blocks() == 1  # the grace period still protects the blocks
        time.sleep(0.2)
        assert exporter.poll_released() == [[5]]
        assert exporter.held_blocks() == 0
    finally:
        exporter.close()


def test_pull_after_expiry_is_refused(pool, importer):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 0.2)
    try:
        desc = importer.open(exporter.export("r1", [5], 3, []))
        time.sleep(0.25)
        dst = torch.zeros(LAYOUT.pool_shape(2), dtype=torch.bfloat16)
        with pytest.raises(KVTransferError, match="expired"):
            importer.pull(desc, dst, [0])
    finally:
        exporter.close()


@pytest.mark.parametrize(
    ("ids", "num_tokens", "hashes", "match"),
    [
        ([], 1, [], "block_ids is empty"),
        ([16], 1, [], r"block_ids: 16 not in \[0, 16\)"),
        ([1, 2], 9, [], "num_tokens: 9 tokens do not fit"),
        ([1, 2], 0, [], "num_tokens must be positive"),
        ([1], 4, [1, 2], "block_hashes: 2 hashes for 1 blocks"),
        ([1], 4, [-5], "block_hashes: -5 is not a u64"),
    ],
)
def test_bad_exports_are_refused(pool, ids, num_tokens, hashes, match):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0)
    try:
        with pytest.raises(KVTransferError, match=match):
            exporter.export("r1", ids, num_tokens, hashes)
        assert exporter.held_blocks() == 0
    finally:
        exporter.close()
    with pytest.raises(KVTransferError, match="closed"):
        exporter.export("r1", [1], 1, [])


def test_bad_exporter_config_is_refused(pool):
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        KVExporterImpl(pool, LAYOUT, "p0", 0)
    with pytest.raises(ConfigError, match="kv_release_transport"):
        KVExporterImpl(pool, LAYOUT, "p0", 1.0, transport="udp")
    other = KVLayout(2, 2, 8, 8, "bfloat16", "tiny")
    with pytest.raises(ConfigError, match="kv layout"):
        KVExporterImpl(pool, other, "p0", 1.0)


def test_layout_mismatch_names_both_layouts(pool):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0)
    imp = KVImporterImpl(KVLayout(2, 2, 8, 4, "float32", "tiny"))
    try:
        with pytest.raises(KVTransferError) as err:
            imp.open(exporter.export("r1", [1], 4, [7]))
        assert "dtype=bfloat16" in str(err.value) and "dtype=float32" in str(err.value)
    finally:
        imp.close()
        exporter.close()


def test_pull_checks_its_destination(pool, importer):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0)
    try:
        desc = importer.open(exporter.export("r1", [1, 2], 8, []))
        good = torch.zeros(LAYOUT.pool_shape(4), dtype=torch.bfloat16)
        cases = [
            (torch.zeros(LAYOUT.pool_shape(4), dtype=torch.float32), [0, 1], "dst_pool"),
            (torch.zeros((4, 2, 2, 8, 2, 8), dtype=torch.bfloat16), [0, 1], "dst_pool"),
            (good, [0], "dst_block_ids: 1 blocks for 2"),
            (good, [0, 4], r"dst_block_ids: 4 is not a block id in \[0, 4\)"),
            (good, [-1, 0], "dst_block_ids"),
            (good, [1, 1], "appears twice"),
        ]
        for dst, ids, match in cases:
            with pytest.raises(KVTransferError, match=match):
                importer.pull(desc, dst, ids)
        assert not good.any()
    finally:
        exporter.close()


def test_closed_importer_refuses_work(pool):
    exporter = KVExporterImpl(pool, LAYOUT, "p0", 30.0)
    imp = KVImporterImpl(LAYOUT)
    try:
        raw = exporter.export("r1", [1], 4, [])
        desc = imp.open(raw)
        imp.close()
        imp.close()
        with pytest.raises(KVTransferError, match="closed"):
            imp.open(raw)
        imp.release(desc)  # no-op after close
    finally:
        exporter.close()
