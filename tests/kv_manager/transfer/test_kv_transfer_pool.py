"""`allocate_pool`: plain and shared-memory pools, permissions, cleanup, bad arguments."""

from __future__ import annotations

import _posixshmem
import errno
import gc
import os
import secrets
import stat
import subprocess
import sys

import pytest
import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer import LocalPool, ShmPool, allocate_pool
from kv_manager.transfer.handle import decode_handle
from trident.core.errors import ConfigError

torch.set_num_threads(1)

LAYOUT = KVLayout(2, 2, 8, 4, "bfloat16", "tiny")


def _shm_path(pool: ShmPool) -> str:
    return f"/dev/shm/{pool.name}"


def test_plain_cpu_pool_is_zeroed_local_memory():
    pool = allocate_pool(LAYOUT, 5, "cpu", shareable=False)
    assert isinstance(pool, LocalPool)
    assert pool.tensor.shape == LAYOUT.pool_shape(5) and pool.tensor.dtype == torch.bfloat16
    assert not pool.tensor.any()
    assert decode_handle(pool.handle()).kind == "local"
    pool.close()
    pool.close()


def test_shareable_cpu_pool_is_private_shared_memory():
    a = allocate_pool(LAYOUT, 6, "cpu", shareable=True)
    b = allocate_pool(LAYOUT, 6, "cpu", shareable=True)
    try:
        assert isinstance(a, ShmPool) and a.name != b.name
        assert (
            a.name.startswith(f"trident_kv_{os.getpid()}_") and len(a.name.rsplit("_", 1)[1]) == 32
        )
        st = os.stat(_shm_path(a))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 6 * LAYOUT.block_nbytes
        assert a.tensor.shape == LAYOUT.pool_shape(6) and not a.tensor.any()
        a.tensor[3].fill_(1.5)  # writable, and the bytes land in the segment
        with open(_shm_path(a), "rb") as f:
            f.seek(3 * LAYOUT.block_nbytes)
            assert (
                f.read(2)
                == torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
            )
        h = decode_handle(a.handle())
        assert (h.kind, h.shm_name, h.num_blocks, h.layout) == ("shm", a.name, 6, LAYOUT)
    finally:
        a.close()
        b.close()
    assert not os.path.exists(_shm_path(a)) and not os.path.exists(_shm_path(b))


def test_close_is_idempotent_and_keeps_live_views_valid():
    pool = allocate_pool(LAYOUT, 4, "cpu", shareable=True)
    view = pool.tensor[1]
    view.fill_(2.0)
    pool.close()
    pool.close()
    assert not os.path.exists(_shm_path(pool))
    assert pool.tensor.numel() == 0
    assert float(view.float().mean()) == 2.0  # still mapped: no use-after-unmap crash


def test_forgotten_pool_is_unlinked_when_collected():
    pool = allocate_pool(LAYOUT, 4, "cpu", shareable=True)
    path = _shm_path(pool)
    assert os.path.exists(path)
    del pool
    gc.collect()
    assert not os.path.exists(path)


def test_too_little_shared_memory_is_a_clear_config_error(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ConfigError, match=r"num_blocks: .*shm-size"):
        allocate_pool(LAYOUT, 4, "cpu", shareable=True)
    leaked = [
        n
        for n in set(os.listdir("/dev/shm")) - before
        if n.startswith(f"trident_kv_{os.getpid()}_")
    ]
    assert not leaked


@pytest.mark.parametrize(
    ("num_blocks", "device", "field"),
    [
        (0, "cpu", "num_blocks"),
        (-3, "cpu", "num_blocks"),
        (2.0, "cpu", "num_blocks"),
        (2, "tpu", "device"),
        (2, "meta", "device"),
    ],
)
def test_bad_arguments_name_the_field(num_blocks, device, field):
    with pytest.raises(ConfigError, match=field):
        allocate_pool(LAYOUT, num_blocks, device, shareable=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_pool_without_cuda_is_refused():
    import kv_manager.transfer.cuda_pool  # noqa: F401  (importable without CUDA)

    with pytest.raises(ConfigError, match="device: 'cuda'.*no CUDA"):
        allocate_pool(LAYOUT, 2, "cuda", shareable=True)


def test_a_new_pool_removes_segments_of_killed_workers():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (a killed worker's)

    def segment(pid: int) -> str:
        name = f"trident_kv_{pid}_{secrets.token_hex(16)}"
        os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600))
        return name

    orphan, live = segment(dead.pid), segment(os.getpid())
    other = f"unrelated_{secrets.token_hex(4)}"
    os.close(_posixshmem.shm_open("/" + other, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600))
    try:
        pool = ShmPool(LAYOUT, 4)
        assert not os.path.exists(f"/dev/shm/{orphan}")
        assert os.path.exists(f"/dev/shm/{live}") and os.path.exists(f"/dev/shm/{other}")
        pool.close()
    finally:
        for name in (orphan, live, other):
            if os.path.exists(f"/dev/shm/{name}"):
                _posixshmem.shm_unlink("/" + name)
