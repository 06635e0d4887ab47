"""The torch engine's own float32 CPU kernels (x86-64 with AVX2 and FMA), over ctypes.

`LlamaModel` asks `load()` for them when it runs float32 on CPU with `cpu_kernels` on: the
packed GEMM for every projection and the LM head, and a decoder layer's elementwise steps
(RMSNorm, SwiGLU). The `ModelRunner` hands them to attention through `AttentionMetadata`
when they can read its KV pool (decode attention, and RoPE with the step's KV writes), and
their argmax to the sampler for the greedy rows. Where
they cannot be had (another CPU, no compiler; `kernels.build`) `load()` returns None and the
model keeps PyTorch's kernels. ctypes releases the GIL for each call. The GEMM and attention
use torch's intra-op thread count, on the library's own thread pool (not OpenMP: see the C
source); the elementwise kernels run on the calling thread.

Why: with few rows (decode) MKL's and oneDNN's float32 GEMMs repack the weight on every call
and reach a third of the FMA rate at 16 rows on one AVX2 core; the packed kernel streams
each weight once, prefetching the next panel while it computes (`benchmarks.engine` has
the figures). Decode attention reads K/V in place from the paged pool instead of gathering
a padded copy per layer, and each elementwise step is one pass instead of several PyTorch
ops, each with its own dispatch.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from collections.abc import Sequence

import torch

from plugins.torch_engine.kernels import build

log = logging.getLogger(__name__)

PANEL = 16  # gemm_packed's panel width (NR in the C source)
_lock = threading.Lock()
_loaded: dict[str, CpuKernels | None] = {}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rows whose elements are adjacent (row stride free)."""
    return x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()


class CpuKernels:
    """Typed entry points of the loaded library. Stateless; safe from any thread. Every
    method takes float32 tensors and returns fresh ones, or writes where it says."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i32, i64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float

        def entry(name: str, restype, *argtypes):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), restype
            return fn

        self._gemm = entry("gemm_packed", None, ptr, i32, i32, i64, ptr, i32, ptr, i64, ptr, i32, i32)
        self._attn = entry("decode_attention", i32, ptr, i64, ptr, i64, i64, i64, ptr, i32, ptr, i32, i32, i32, i32,
                           i32, f32, ptr, i32)
        self._norm = entry("rms_norm", None, ptr, i64, i32, i32, ptr, f32, ptr, i64)
        self._silu = entry("silu_mul", None, ptr, i64, i32, i32, ptr)
        self._rope = entry("rope_store", None, ptr, i64, i32, ptr, ptr, i32, i32, i32, ptr, i64, i64, i64, ptr, ptr)
        self._argmax = entry("argmax_rows", None, ptr, i64, i32, i32, ptr)
        self._layers = entry("decode_layers", i32, ptr, i32, i32, i32, ptr, f32, i32, i32, i32, i32, ptr, ptr, ptr,
                             i64, i64, i64, i64, ptr, ptr, ptr, i32, ptr, i32, f32, ptr, i32)

    def pack(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
        """Panels of a float32 weight [out, in] (rows padded to a multiple of 16 with zeros)."""
        return PackedWeight(self, w, bias)

    def decode_attention(self, q: torch.Tensor, pool_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of q [seqs, heads, dim] (each sequence's heads dense, the sequences any
        stride apart) over pool_layer [blocks, 2, block, kv_heads, dim] (one layer's view of
        the pool) through tables [seqs, width] (int64) and lens [seqs] (int32, tokens in the
        cache including this step's). Returns [seqs, heads, dim]."""
        seqs, heads, dim = q.shape
        _, _, block, kv_heads, _ = pool_layer.shape
        if q.stride(2) != 1 or q.stride(1) != dim:
            q = q.contiguous()
        out = torch.empty(seqs, heads, dim, dtype=torch.float32)
        st = pool_layer.stride()
        rc = self._attn(
            q.data_ptr(), q.stride(0), pool_layer.data_ptr(), st[0], st[2], st[1], tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), seqs, heads, kv_heads, dim, block, scale, out.data_ptr(), torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("decode attention: no memory for the attention scores")
        return out

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   pool_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """For rows qkv [T, (heads + 2 * kv_heads) * dim] (elements adjacent): rotate the query
        heads in place and write the rotated keys and the values into slot (blocks[t],
        offsets[t]) (int64) of pool_layer [blocks, 2, block, kv_heads, dim]. cos, sin: [T, dim]."""
        t, dim = qkv.shape[0], pool_layer.shape[-1]
        assert qkv.stride(1) == 1 and qkv.shape[1] == (heads + 2 * kv_heads) * dim
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        st = pool_layer.stride()
        self._rope(qkv.data_ptr(), qkv.stride(0), t, cos.data_ptr(), sin.data_ptr(), heads, kv_heads, dim,
                   pool_layer.data_ptr(), st[0], st[2], st[1], blocks.data_ptr(), offsets.data_ptr())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of rows x [T, dim] by weight [dim] (float32, as Hugging Face's LlamaRMSNorm)."""
        x = _rows(x)
        out = torch.empty(x.shape, dtype=torch.float32)
        self._norm(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr(), x.shape[1])
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for rows gate_up [T, 2 * width] (gate first): [T, width]."""
        gate_up = _rows(gate_up)
        width = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], width, dtype=torch.float32)
        self._silu(gate_up.data_ptr(), gate_up.stride(0), gate_up.shape[0], width, out.data_ptr())
        return out

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """torch.argmax(logits, dim=-1).tolist() for CPU rows logits [S, vocab] (float32,
        elements adjacent): the same indices (first maximum; a NaN counts as the maximum)."""
        logits = _rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr())
        return out.tolist()

    @staticmethod
    def handles_attention(pool: torch.Tensor, num_heads: int) -> bool:
        """Whether decode_attention and rope_store take this pool (float32, inner dims dense)
        and head count."""
        _, _, _, _, kv_heads, dim = pool.shape
        return (pool.dtype == torch.float32 and dim % 8 == 0 and num_heads % kv_heads == 0
                and pool.stride(5) == 1 and pool.stride(4) == dim)


_PROJECTIONS = ("qkv", "o", "gate_up", "down")


class _LayerWeights(ctypes.Structure):
    """`struct layer_weights` of the C source."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("attn_norm", "mlp_norm", "qkv", "qkv_bias", "o", "o_bias", "gate_up", "down")]


class DecodeLayers:
    """Every decoder layer of a model as one call, for decode-only steps (`decode_layers` in
    the C source: the per-op forward's steps with no Python between them). `LlamaModel`
    builds it once its weights are packed (`make`, over its layers: objects with `attn_norm`,
    `mlp_norm` and the packed projections as attributes) and calls it from `forward`; it holds
    raw pointers into the model's weights, which the model keeps alive."""

    def __init__(self, kernels: CpuKernels, layers: Sequence, eps: float, heads: int, kv_heads: int, dim: int) -> None:
        self._k = kernels
        self._weights = (_LayerWeights * len(layers))()
        for slot, layer in zip(self._weights, layers, strict=True):
            for name in ("attn_norm", "mlp_norm"):
                setattr(slot, name, getattr(layer, name).data_ptr())
            for name in _PROJECTIONS:
                setattr(slot, name, getattr(layer, name).panels.data_ptr())
            slot.qkv_bias, slot.o_bias = _ptr(layer.qkv.bias) or None, _ptr(layer.o.bias) or None
        first = layers[0]
        self.hidden, self.inter = first.o.out_features, first.gate_up.out_features // 2
        self.eps, self.heads, self.kv_heads, self.dim = eps, heads, kv_heads, dim
        self._scratch_per_row = self.hidden + first.qkv.out_features + heads * dim + 3 * self.inter

    @classmethod
    def make(cls, kernels: CpuKernels, layers: Sequence, eps: float, heads: int, kv_heads: int, dim: int) -> DecodeLayers | None:
        """None unless every projection is packed without padding, as `decode_layers` reads them."""
        for layer in layers:
            for name in _PROJECTIONS:
                w = getattr(layer, name)
                if not isinstance(w, PackedWeight) or w.out_features % PANEL:
                    return None
            if layer.o.out_features != layer.down.out_features or layer.qkv.out_features != (heads + 2 * kv_heads) * dim:
                return None
        return cls(kernels, layers, eps, heads, kv_heads, dim) if layers else None

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, slot_blocks: torch.Tensor,
                 slot_offsets: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float) -> None:
        """All layers on h [rows, hidden] (dense float32, updated in place) for one decode token
        per sequence; pool [blocks, layers, 2, block, kv_heads, dim] as `handles_attention`."""
        rows = h.shape[0]
        assert h.is_contiguous() and h.shape[1] == self.hidden
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        scratch = torch.empty(rows * self._scratch_per_row, dtype=torch.float32)
        st = pool.stride()
        rc = self._k._layers(
            h.data_ptr(), rows, self.hidden, len(self._weights), self._weights, self.eps, self.heads, self.kv_heads,
            self.dim, self.inter, cos.data_ptr(), sin.data_ptr(), pool.data_ptr(), st[1], st[0], st[3], st[2],
            slot_blocks.data_ptr(), slot_offsets.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
            pool.shape[3], scale, scratch.data_ptr(), torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("decode attention: no memory for the attention scores")


class PackedWeight:
    """A linear layer's weight in `gemm_packed`'s panel layout, with its optional bias;
    calling it computes `x @ w.T + bias` for float32 x [rows, in]; `add_to` adds that to y."""

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

    def _run(self, x: torch.Tensor, y: torch.Tensor, add: bool) -> None:
        if x.shape[0]:
            self._k._gemm(
                x.data_ptr(), x.shape[0], self.in_features, x.stride(0), self.panels.data_ptr(), self._padded,
                y.data_ptr(), y.stride(0), _ptr(self.bias), int(add), torch.get_num_threads(),
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = _rows(x.reshape(-1, self.in_features))
        y = torch.empty(x.shape[0], self._padded, dtype=torch.float32)
        self._run(x, y, add=False)
        if self._padded != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += x @ w.T + bias in place, for float32 y [rows, out] whose elements are adjacent."""
        if self._padded != self.out_features or y.dtype != torch.float32 or y.stride(-1) != 1:
            y += self(x)
            return
        self._run(_rows(x), y, add=True)


def load(cache_root: str = "") -> CpuKernels | None:
    """The kernels, compiled if needed; None (logged once) where they cannot be had."""
    with _lock:
        if cache_root not in _loaded:
            _loaded[cache_root] = _load(cache_root)
        return _loaded[cache_root]


def _load(cache_root: str) -> CpuKernels | None:
    why = build.supported()
    if why is None:
        try:
            return CpuKernels(ctypes.CDLL(str(build.build(cache_root))))
        except (OSError, subprocess.SubprocessError) as e:
            why = f"building them failed: {e}"
    log.warning("float32 CPU kernels unavailable (%s); using PyTorch's", why)
    return None
