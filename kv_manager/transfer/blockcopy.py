"""Copy whole KV blocks from one pool tensor to another, as fast as memcpy allows.

Both pools have shape `(num_blocks, *block_shape)` and are contiguous, so block `i` is the
byte range `[i * block_nbytes, (i + 1) * block_nbytes)`. Runs of consecutive ids on both
sides coalesce into one range.

- CPU -> CPU: `memmove` on raw pointers (no temporaries, no per-block tensor views: a view
  and a `copy_` dispatch cost more than moving a 360 KiB block), split over a small thread
  pool; `ctypes` drops the GIL during each call. Callers must have checked every id.
- GPU, same device: one Triton gather-scatter kernel launch for all blocks when Triton is
  installed, else `index_select` + `index_copy_` (twice the memory traffic).
- anything else (CPU <-> GPU, two GPUs): per-run `copy_`, or gather + transfer + scatter.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)

_CHUNK = 4 << 20  # split long runs so the threads share the work evenly
_PARALLEL_MIN_BYTES = 2 << 20  # below this, handing work to a thread costs more than it saves
_MAX_COPY_RUNS = 8  # on GPUs, up to this many runs go as plain copies, more as one kernel
_memmove = ctypes.memmove


def coalesce(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both id lists advance by one."""
    runs: list[tuple[int, int, int]] = []
    s0 = d0 = -2
    n = 0
    for s, d in zip(src_ids, dst_ids, strict=True):
        if n and s == s0 + n and d == d0 + n:
            n += 1
            continue
        if n:
            runs.append((s0, d0, n))
        s0, d0, n = s, d, 1
    if n:
        runs.append((s0, d0, n))
    return runs


class BlockCopier:
    """Moves blocks between pools for one `KVImporterImpl` (engine loop thread only).

    Owns a small thread pool for CPU copies (`threads` workers; default: torch's intra-op
    thread count, the parallelism the engine was configured with). `close()` stops it.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads or torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None

    def copy(
        self, src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]
    ) -> None:
        """dst[dst_ids[i]] = src[src_ids[i]] for all i; returns when the data is in place."""
        if not src_ids:
            return
        runs = coalesce(src_ids, dst_ids)
        if src.device.type == "cpu" and dst.device.type == "cpu":
            self._copy_cpu(src, dst, runs)
        elif src.device == dst.device and len(runs) > _MAX_COPY_RUNS:
            _gather_scatter_cuda(src, dst, src_ids, dst_ids)
        elif len(runs) <= _MAX_COPY_RUNS:
            for s, d, n in runs:
                dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
        else:
            si = torch.tensor(src_ids, dtype=torch.long, device=src.device)
            di = torch.tensor(dst_ids, dtype=torch.long, device=dst.device)
            dst.index_copy_(0, di, src.index_select(0, si).to(dst.device))
        if dst.is_cuda:
            torch.cuda.current_stream(dst.device).synchronize()
        if src.is_cuda and src.device != dst.device:
            torch.cuda.current_stream(src.device).synchronize()

    def _copy_cpu(
        self, src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]
    ) -> None:
        bn = src.stride(0) * src.element_size()
        sp, dp = src.data_ptr(), dst.data_ptr()
        pieces: list[tuple[int, int, int]] = []
        for s, d, n in runs:
            off, total = 0, n * bn
            while off < total:
                size = min(_CHUNK, total - off)
                pieces.append((dp + d * bn + off, sp + s * bn + off, size))
                off += size
        total_bytes = sum(p[2] for p in pieces)
        workers = min(self.threads, len(pieces))
        if workers <= 1 or total_bytes < _PARALLEL_MIN_BYTES:
            _move(pieces)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kv-copy")
        shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for piece in sorted(pieces, key=lambda p: -p[2]):
            i = loads.index(min(loads))
            shares[i].append(piece)
            loads[i] += piece[2]
        futures: list[Future[None]] = [self._pool.submit(_move, share) for share in shares[1:]]
        _move(shares[0])
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _move(pieces: list[tuple[int, int, int]]) -> None:
    for dst, src, size in pieces:
        _memmove(dst, src, size)


def _gather_scatter_cuda(
    src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]
) -> None:
    ids = torch.tensor([*src_ids, *dst_ids], dtype=torch.long, device=dst.device)
    n = len(src_ids)
    kernel = _triton_kernel()
    if kernel is None:
        dst.index_copy_(0, ids[n:], src.index_select(0, ids[:n]))
        return
    bn = src.stride(0) * src.element_size()
    word = torch.int64 if bn % 8 == 0 else torch.int32 if bn % 4 == 0 else torch.int16
    sw = src.view(-1).view(torch.uint8).view(word)
    dw = dst.view(-1).view(torch.uint8).view(word)
    words = bn // sw.element_size()
    block = 4096
    grid = (n, -(-words // block))
    kernel[grid](sw, dw, ids, ids[n:], words, BLOCK=block, num_warps=8)


_KERNEL: object | None = None
_KERNEL_TRIED = False


def _triton_kernel() -> object | None:
    """The Triton block-copy kernel, built on first use; None when Triton is missing."""
    global _KERNEL, _KERNEL_TRIED
    if _KERNEL_TRIED:
        return _KERNEL
    _KERNEL_TRIED = True
    try:
        import triton
        import triton.language as tl
    except ImportError:
        log.info("triton not installed: GPU KV pulls use index_select + index_copy_")
        return None

    @triton.jit
    def copy_blocks(src, dst, src_ids, dst_ids, words, BLOCK: tl.constexpr):
        pair = tl.program_id(0)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < words
        s = tl.load(src_ids + pair)
        d = tl.load(dst_ids + pair)
        v = tl.load(src + s * words + offs, mask=mask)
        tl.store(dst + d * words + offs, v, mask=mask)

    _KERNEL = copy_blocks
    return _KERNEL
