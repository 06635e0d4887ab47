"""A CPU KV pool in POSIX shared memory, and the read-only view a peer maps of it.

The segment is `/dev/shm/trident_kv_<pid>_<128 random bits>`: unguessable, mode 0600 (only
the same user can open it), its pages reserved up front with `posix_fallocate` so that a
too-small `/dev/shm` (Docker's default is 64 MiB) fails at start with a clear message
instead of a SIGBUS in the middle of a forward pass.

Unmapping: `torch.frombuffer` does not pin the mapping, so closing the `mmap` under a live
tensor would turn every later access into a crash. `close()` therefore unlinks the name and
drops this object's view; the pages are unmapped (by CPython's refcounting) as soon as no
tensor view of them remains — at once when the engine has let go of the tensor.
"""

from __future__ import annotations

import _posixshmem
import errno
import logging
import mmap
import os
import secrets
import warnings
import weakref

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer.handle import SHM_NAME_RE, SHM_PREFIX, PoolHandle, encode_handle
from kv_manager.transfer.local_pool import register_local, torch_dtype
from trident.core.errors import ConfigError, KVTransferError

log = logging.getLogger(__name__)

# Pre-fault the mapping: a 360 KiB block is 90 pages, and faulting them on first touch
# costs more than copying them.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class ShmPool:
    """A shareable CPU KV pool in POSIX shared memory.

    Built by `allocate_pool(..., device="cpu", shareable=True)`; the engine owns the pool and
    every block in it, writes it from its loop thread, and calls `close()` at shutdown
    (idempotent). Peers map it read-only through `KVImporter` with the bytes of `handle()`.
    If the engine never calls `close()`, the name is unlinked when this object is collected
    or the interpreter exits normally; only a killed process leaves its segment behind, and
    the next pool created on the machine removes it (`sweep_orphans`).
    """

    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.pool_id = secrets.token_hex(16)
        self.name = f"{SHM_PREFIX}{os.getpid()}_{self.pool_id}"
        self.closed = False
        nbytes = layout.block_nbytes * num_blocks
        sweep_orphans()
        fd = _posixshmem.shm_open("/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        self._finalizer = weakref.finalize(self, _unlink, self.name)
        try:
            os.fchmod(fd, 0o600)  # the mode of shm_open is filtered by the umask only
            _reserve(fd, nbytes)
            buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(fd)
        flat = torch.frombuffer(buf, dtype=torch_dtype(layout))
        self.tensor = flat.view(layout.pool_shape(num_blocks))
        self._handle = encode_handle(
            PoolHandle("shm", self.pool_id, os.getpid(), layout, num_blocks, shm_name=self.name)
        )
        register_local(self.pool_id, self)
        log.debug(
            "created shm KV pool %s (%d blocks, %.1f MiB)", self.name, num_blocks, nbytes / 2**20
        )

    def handle(self) -> bytes:
        return self._handle

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer()
        self.tensor = torch.empty((0, *self.layout.block_shape), dtype=torch_dtype(self.layout))

    def __repr__(self) -> str:
        return f"ShmPool({self.name}, {self.layout.describe()}, num_blocks={self.num_blocks})"


def attach_shm(handle: PoolHandle) -> torch.Tensor:
    """Map a peer's pool read-only; returns a tensor of `layout.pool_shape(num_blocks)`.

    The mapping lives as long as the returned tensor (the importer caches it per peer).
    """
    try:
        fd = _posixshmem.shm_open("/" + handle.shm_name, os.O_RDONLY, mode=0)
    except FileNotFoundError as e:
        raise KVTransferError(
            f"peer KV pool {handle.shm_name} is gone (its worker, pid {handle.pid}, exited or restarted)"
        ) from e
    except PermissionError as e:
        raise KVTransferError(
            f"cannot open peer KV pool {handle.shm_name}: permission denied (pools are 0600; "
            "prefill and decode workers must run as the same user)"
        ) from e
    try:
        size = os.fstat(fd).st_size
        if size < handle.nbytes:
            raise KVTransferError(
                f"peer KV pool {handle.shm_name} holds {size} bytes, its handle says {handle.nbytes}"
            )
        buf = mmap.mmap(fd, handle.nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        # Read-only on purpose: a decode worker must never write a prefill worker's pool.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(buf, dtype=torch_dtype(handle.layout))
    return flat.view(handle.layout.pool_shape(handle.num_blocks))


def sweep_orphans(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink this user's pool segments whose creating process is dead (it was killed: a
    pool closes its own otherwise); returns their names. Called when a pool is created, so a
    worker restarted after a crash (Triton restarts a dead stub) reclaims its predecessor's
    memory. Pids are of this pid namespace: a /dev/shm shared across pid namespaces (pods
    sharing IPC but not processes) must not hold Trident pools of more than one of them."""
    removed = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(shm_dir))
    except OSError:
        return removed
    for entry in entries:
        pid = _segment_pid(entry.name)
        if pid is None or _alive(pid):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            _posixshmem.shm_unlink("/" + entry.name)
        except OSError:  # gone already, or not ours to remove
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d KV pool segment(s) left by killed workers: %s", len(removed), ", ".join(removed))
    return removed


def _segment_pid(name: str) -> int | None:
    if not SHM_NAME_RE.match(name):
        return None
    return int(name[len(SHM_PREFIX) :].split("_", 1)[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def segment_exists(name: str) -> bool:
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    os.close(fd)
    return True


def _reserve(fd: int, nbytes: int) -> None:
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        os.ftruncate(fd, nbytes)
        return
    try:
        fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            free = _shm_free_bytes()
            raise ConfigError(
                f"num_blocks: a KV pool of {nbytes / 2**20:.0f} MiB does not fit in shared memory "
                f"({free / 2**20:.0f} MiB free in /dev/shm); lower num_blocks/kv_cache_mb or give "
                "the container more shared memory (docker run --shm-size)"
            ) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, nbytes)


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not unlink shared memory %s: %s", name, e)
