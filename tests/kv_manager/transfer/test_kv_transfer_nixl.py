"""KV transfer through NIXL between real processes, as between nodes: the spawned prefill
process owns a plain (unshareable) pool registered with a NIXL agent and exports leases;
this process opens the descriptor, READs the blocks through NIXL's UCX backend and releases.
Peers are authenticated by the handle's HMAC tag before their agent is accepted."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import msgpack
import pytest
import torch
from kv_peer import LAYOUT_ARGS, block_bytes, prefill_main

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVImporterImpl, decode_descriptor, encode_descriptor
from kv_manager.transfer.handle import decode_handle
from kv_manager.transfer.nixl import NixlPool
from kv_manager.transfer.pool import allocate_pool
from tests.waiting import wait_until
from trident.core.cluster_secret import load_secret
from trident.core.errors import ConfigError, KVTransferError

pytest.importorskip("nixl_cu12", reason="NIXL (nixl-cu12) is installed by make test")
torch.set_num_threads(1)

NUM_BLOCKS = 32
LAYOUT = KVLayout(*LAYOUT_ARGS)
SECRET = b"a-cluster-secret-of-32-bytes-len"
CTX = mp.get_context("spawn")


@pytest.fixture(scope="module")
def peer():
    conn, child = CTX.Pipe()
    proc = CTX.Process(
        target=prefill_main, args=(child, LAYOUT_ARGS, NUM_BLOCKS, "cpu", 99, SECRET), daemon=True
    )
    proc.start()
    child.close()
    assert conn.poll(120), "prefill peer did not start"
    conn.recv()

    def call(*cmd):
        conn.send(cmd)
        assert conn.poll(60), f"prefill peer did not answer {cmd[0]}"
        return conn.recv()

    yield call
    call("close")
    proc.join(30)


def test_decode_reads_scattered_blocks_and_releases_the_lease(peer) -> None:
    importer = KVImporterImpl(LAYOUT, secret=SECRET)
    dst = allocate_pool(LAYOUT, NUM_BLOCKS, "cpu", shareable=False)
    try:
        src_ids, dst_ids = [7, 3, 30, 12, 13], [0, 9, 4, 31, 2]
        raw = peer("export", "long", src_ids, len(src_ids) * LAYOUT.block_size, [])
        assert decode_handle(decode_descriptor(raw).pool_handle).kind == "nixl"
        desc = importer.open(raw)
        importer.pull(desc, dst.tensor, dst_ids)
        assert block_bytes(dst.tensor, dst_ids) == peer("blocks", src_ids)
        # the peer's agent is added once: a second descriptor reuses it
        again = importer.open(peer("export", "long", [1], LAYOUT.block_size, []))
        importer.pull(again, dst.tensor, [5])
        assert block_bytes(dst.tensor, [5]) == peer("blocks", [1])
        importer.release(desc)
        importer.release(again)
        wait_until(lambda: peer("held", "long") == 0, tick=lambda: peer("poll", "long"))
    finally:
        importer.close()
        dst.close()


def _retag(raw: bytes, **changes) -> bytes:
    """The descriptor with its pool handle's fields changed (the tag left as it was)."""
    desc = decode_descriptor(raw)
    body = msgpack.unpackb(desc.pool_handle, raw=False)
    body.update(changes)
    return encode_descriptor(dataclasses.replace(desc, pool_handle=msgpack.packb(body, use_bin_type=True)))


@pytest.mark.parametrize(
    "secret, changes, match, logged",
    [
        (b"another-secret-of-the-same-size!", {}, "not signed with this cluster's KV secret", True),
        (SECRET, {"base_addr": 4096}, "not signed with this cluster's KV secret", True),
        (SECRET, {"nixl_meta": b"forged"}, "not signed with this cluster's KV secret", True),
        (SECRET, {"auth": "00" * 32}, "not signed with this cluster's KV secret", True),
        (None, {}, "no KV secret", False),
        (SECRET, {"auth": "short"}, "pool_handle.auth", False),
    ],
)
def test_a_peer_without_the_secret_is_refused(peer, secret, changes, match, logged, caplog) -> None:
    importer = KVImporterImpl(LAYOUT, secret=secret)
    try:
        raw = peer("export", "long", [2], LAYOUT.block_size, [])
        with pytest.raises(KVTransferError, match=match):
            importer.open(_retag(raw, **changes))
        assert ("refused KV pool" in caplog.text) == logged
        assert importer._nixl is None or not importer._nixl._remotes  # no agent was added
        importer.release(decode_descriptor(raw))  # the decode side ends a lease it cannot use
        wait_until(lambda: peer("held", "long") == 0, tick=lambda: peer("poll", "long"))
    finally:
        importer.close()


def test_nixl_pools_need_a_secret_and_secrets_come_from_files_or_env(tmp_path) -> None:
    pool = allocate_pool(LAYOUT, 4, "cpu", shareable=False)
    try:
        with pytest.raises(ConfigError, match="TRIDENT_KV_SECRET_FILE"):
            NixlPool(pool, "prefill", None)
    finally:
        pool.close()
    path = tmp_path / "kv.secret"
    path.write_bytes(SECRET + b"\n")
    assert load_secret({"TRIDENT_KV_SECRET_FILE": str(path), "TRIDENT_KV_SECRET": "x"}) == SECRET
    assert load_secret({"TRIDENT_KV_SECRET": SECRET.decode()}) == SECRET
    assert load_secret({}) is None
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_secret({"TRIDENT_KV_SECRET": "short"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret({"TRIDENT_KV_SECRET_FILE": str(tmp_path / "missing")})
