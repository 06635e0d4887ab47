"""KV transfer over CUDA IPC: a spawned producer process owns a GPU pool; this process opens
its IPC handle and pulls device-to-device. Run by tests/gpu/run_device_checks.sh."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest
import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.blockcopy import _triton_kernel
from kv_manager.transfer.handle import decode_handle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYOUT = KVLayout(4, 2, 64, 16, "bfloat16", "gpu-test-model")
NUM_BLOCKS = 128
CTX = mp.get_context("spawn")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).cpu()  # compare bits: NaN-safe


def producer_main(conn) -> None:
    pool = allocate_pool(LAYOUT, NUM_BLOCKS, "cuda", shareable=True)
    flat = pool.tensor.view(-1).view(torch.int16)
    flat.copy_(torch.randint(-(2**15), 2**15, flat.shape, dtype=torch.int16, device=flat.device))
    exporter = KVExporterImpl(pool, LAYOUT, "gpu-prefill", 60.0)
    conn.send(("ready", os.getpid()))
    while True:
        cmd, *args = conn.recv()
        if cmd == "export":
            ids = args[0]
            conn.send(exporter.export("r", ids, len(ids) * LAYOUT.block_size, []))
        elif cmd == "blocks":
            conn.send(_bits(pool.tensor[args[0]]).numpy().tobytes())
        elif cmd == "held":
            exporter.poll_released()
            conn.send(exporter.held_blocks())
        elif cmd == "close":
            exporter.close()
            pool.close()
            conn.send("closed")
            return


@pytest.fixture(scope="module")
def producer():
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=producer_main, args=(child,), daemon=True)
    proc.start()
    child.close()
    assert conn.poll(120), "producer did not start"
    conn.recv()

    def call(*cmd):
        conn.send(cmd)
        assert conn.poll(60), f"producer did not answer {cmd[0]}"
        return conn.recv()

    yield call
    call("close")
    proc.join(30)


@pytest.fixture
def importer():
    imp = KVImporterImpl(LAYOUT)
    yield imp
    imp.close()


def _wait_unheld(producer) -> None:
    deadline = time.monotonic() + 10
    while producer("held") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert producer("held") == 0


@pytest.mark.parametrize("pattern", ["many", "scattered", "two_runs", "one_block"])
def test_device_to_device_pull_is_byte_exact(producer, importer, pattern):
    rng = random.Random(pattern)
    if pattern == "many":  # > 64 ids: straight to the kernel
        src, dst_ids = rng.sample(range(NUM_BLOCKS), 100), rng.sample(range(128), 100)
    elif pattern == "scattered":  # > 8 runs: the one-launch gather-scatter kernel
        src, dst_ids = rng.sample(range(NUM_BLOCKS), 40), rng.sample(range(128), 40)
    elif pattern == "two_runs":  # few runs: plain copies
        src, dst_ids = [*range(10, 20), *range(50, 55)], [*range(0, 10), *range(20, 25)]
    else:
        src, dst_ids = [77], [3]
    desc = importer.open(producer("export", src))
    handle = decode_handle(desc.pool_handle)
    assert handle.kind == "cuda" and handle.device_uuid
    dst = torch.zeros(LAYOUT.pool_shape(128), dtype=torch.bfloat16, device="cuda")
    importer.pull(desc, dst, dst_ids)
    assert _bits(dst[dst_ids]).numpy().tobytes() == producer("blocks", src)
    untouched = sorted(set(range(128)) - set(dst_ids))
    assert not dst[untouched].any()
    importer.release(desc)
    _wait_unheld(producer)


def test_ipc_handle_is_opened_once_and_pulls_to_cpu(producer, importer):
    descs = [importer.open(producer("export", [i, i + 9])) for i in (1, 2, 3)]
    assert len(importer._peers) == 1
    dst = torch.zeros(LAYOUT.pool_shape(4), dtype=torch.bfloat16)  # GPU -> CPU pull
    for desc in descs:
        importer.pull(desc, dst, [2, 0])
        assert _bits(dst[[2, 0]]).numpy().tobytes() == producer("blocks", list(desc.block_ids))
        importer.release(desc)
    _wait_unheld(producer)


def test_same_process_gpu_pool_is_reached_without_ipc():
    pool = allocate_pool(LAYOUT, 8, "cuda", shareable=True)
    pool.tensor.normal_()
    exporter = KVExporterImpl(pool, LAYOUT, "local", 60.0)
    imp = KVImporterImpl(LAYOUT)
    try:
        desc = imp.open(exporter.export("r", [1, 5], 20, []))
        dst = torch.zeros(LAYOUT.pool_shape(4), dtype=torch.bfloat16, device="cuda")
        imp.pull(desc, dst, [3, 2])
        assert torch.equal(dst[[3, 2]], pool.tensor[[1, 5]])
    finally:
        imp.close()
        exporter.close()
        pool.close()


def test_triton_kernel_is_used_when_installed():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed: pulls use index_select + index_copy_")
    assert _triton_kernel() is not None
