"""The torch engine's own float32 CPU kernels (x86-64 with AVX2 and FMA), over ctypes.

`cpu_kernels.c` is compiled on first use with the system C compiler into
`<cache root>/kernels/` (the root as for converted weights: `TRIDENT_CACHE_DIR`, else
`~/.cache/trident`), keyed by a digest of the source and flags, and loaded once per process.
Images whose runtime has no compiler build it beside the source instead
(`python -m plugins.torch_engine.kernels`, in docker/Dockerfile's build stage); a library
there whose digest matches is used first.
`LlamaModel` asks `load()` for them when it runs float32 on CPU with `cpu_kernels` on; where
they cannot be had (another CPU, no compiler) `load()` returns None and the model keeps
PyTorch's kernels. ctypes releases the GIL for each call; the kernels use torch's own OpenMP
runtime (the same `libgomp.so.1`), with torch's intra-op thread count.

Why: with few rows (decode) MKL's and oneDNN's float32 GEMMs repack the weight on every call
and reach a third of the FMA rate at 16 rows on one AVX2 core; the packed kernel streams
each weight once (`benchmarks.engine` has the figures). Decode attention reads K/V in place
from the paged pool instead of gathering a padded copy per layer.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from plugins.torch_engine import loader

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
PANEL = 16  # gemm_packed's panel width (NR in the C source)
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}


class CpuKernels:
    """Typed entry points of the loaded library. Stateless; safe from any thread."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i32, i64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._gemm = lib.gemm_packed
        self._gemm.argtypes = [ptr, i32, i32, i64, ptr, i32, ptr, i64, ptr, i32]
        self._gemm.restype = None
        self._attn = lib.decode_attention
        self._attn.argtypes = [ptr, ptr, i64, i64, i64, ptr, i32, ptr, i32, i32, i32, i32, i32, f32, ptr, i32]
        self._attn.restype = i32

    def pack(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
        """Panels of a float32 weight [out, in] (rows padded to a multiple of 16 with zeros)."""
        return PackedWeight(self, w, bias)

    def decode_attention(self, q: torch.Tensor, pool_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q [seqs, heads, dim] over pool_layer [blocks, 2, block, kv_heads, dim]
        (one layer's view of the pool) through tables [seqs, width] (int64) and lens [seqs]
        (int32, tokens in the cache including this step's)."""
        seqs, heads, dim = q.shape
        _, _, block, kv_heads, _ = pool_layer.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        st = pool_layer.stride()
        rc = self._attn(
            q.data_ptr(), pool_layer.data_ptr(), st[0], st[2], st[1], tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), seqs, heads, kv_heads, dim, block, scale, out.data_ptr(), torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("decode attention: no memory for the attention scores")
        return out

    @staticmethod
    def handles_attention(pool: torch.Tensor, num_heads: int) -> bool:
        """Whether decode_attention takes this pool (float32, inner dims dense) and head count."""
        _, _, _, _, kv_heads, dim = pool.shape
        return (pool.dtype == torch.float32 and dim % 8 == 0 and num_heads % kv_heads == 0
                and pool.stride(5) == 1 and pool.stride(4) == dim)


class PackedWeight:
    """A linear layer's weight in `gemm_packed`'s panel layout, with its optional bias;
    calling it computes `x @ w.T + bias` for float32 x [rows, in]."""

    __slots__ = ("_k", "panels", "bias", "out_features", "in_features", "_padded")

    def __init__(self, kernels: CpuKernels, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = w.shape
        padded = -(-n // PANEL) * PANEL
        w = w.float()
        if padded != n:
            w = torch.cat([w, w.new_zeros(padded - n, k)])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(padded - n)])
        self._k = kernels
        self.panels = w.view(padded // PANEL, PANEL, k).transpose(1, 2).contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features, self._padded = n, k, padded

    def nbytes(self) -> int:
        return self.panels.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.stride(-1) != 1 or x.dtype != torch.float32:
            x = x.float().contiguous()
        m = x.shape[0]
        y = torch.empty(m, self._padded, dtype=torch.float32)
        if m:
            self._k._gemm(
                x.data_ptr(), m, self.in_features, x.stride(0), self.panels.data_ptr(), self._padded,
                y.data_ptr(), self._padded, 0 if self.bias is None else self.bias.data_ptr(), torch.get_num_threads(),
            )
        if self._padded != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)


def supported() -> str | None:
    """None when this machine can run the kernels, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def load(cache_root: str = "") -> CpuKernels | None:
    """The kernels, compiled if needed; None (logged once) where they cannot be had."""
    with _lock:
        if cache_root not in _loaded:
            _loaded[cache_root] = _load(cache_root)
        return _loaded[cache_root]


def _load(cache_root: str) -> CpuKernels | None:
    why = supported()
    if why is None:
        try:
            return CpuKernels(ctypes.CDLL(str(_build(cache_root))))
        except (OSError, subprocess.SubprocessError) as e:
            why = f"building them failed: {e}"
    log.warning("float32 CPU kernels unavailable (%s); using PyTorch's", why)
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_name() -> str:
    """The compiled library's file name, keyed by the source and the flags."""
    return f"cpu_kernels-{hashlib.sha256(_SOURCE.read_bytes() + ' '.join(_FLAGS).encode()).hexdigest()[:16]}.so"


def _build(cache_root: str) -> Path:
    prebuilt = _SOURCE.parent / library_name()
    if prebuilt.exists():
        return prebuilt
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    return _compile(cc, Path(loader.cache_root(cache_root)) / "kernels" / library_name())


def _compile(cc: str, target: Path) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-2000:])
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        log.info("compiled the float32 CPU kernels into %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
