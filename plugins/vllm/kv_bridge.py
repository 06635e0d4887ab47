"""What a vLLM worker's KV connector shares between its two halves: the staging pool, the
lease exporter and importer of `kv_manager.transfer`, and vLLM's own KV cache tensors.

vLLM builds its connector twice, a scheduler half and a worker half
(`plugins.vllm.connector`). With vLLM's engine core in the worker's process and one
model-runner worker (`VllmEngine`: in-process, tensor and pipeline parallel size 1), both
halves and the engine run on the engine's loop thread, in one process; they find this
object by the worker's id (`bridge_for`).

Who owns what:
- vLLM owns its KV cache and every block in it. The bridge only reads blocks (prefill) and
  writes blocks vLLM's scheduler has allocated to the request being loaded (decode).
- The bridge owns the staging pool: a shareable pool in Trident's KV layout
  (`kv_manager.layout`), as the torch engine's pool is, so the handoff speaks the same
  descriptor, leases and fingerprint whichever engine is on either side. A prefill worker's
  scheduler half reserves staging blocks for a `hold_kv` request, the worker half copies the
  request's blocks there layer by layer during the forward pass, and when the request finishes
  the exporter leases them; `poll_released()` hands them back. Decode workers need no staging:
  they copy from the peer's mapped pool straight into vLLM's blocks.
- `close()` (the engine's shutdown; idempotent) drops the leases, unlinks the staging pool
  and closes the importer's mappings and sockets.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.base import KVDescriptor, KVPoolMemory
from trident.core.errors import ConfigError

logger = logging.getLogger(__name__)

MiB = 1 << 20

_BRIDGES: dict[str, KVBridge] = {}
_LOCK = threading.Lock()


def kv_layout(vllm_config, model_id: str) -> KVLayout:
    """The Trident KV layout of a vLLM engine's cache (one KV cache group, full attention)."""
    mc = vllm_config.model_config
    return KVLayout(
        num_layers=mc.get_num_layers(vllm_config.parallel_config),
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        head_dim=mc.get_head_size(),
        block_size=vllm_config.cache_config.block_size,
        dtype=str(mc.dtype).removeprefix("torch."),
        model_id=model_id,
    )


def probe_key_order(layout: KVLayout, kv_cache_dtype: str) -> bool:
    """Whether vLLM's CPU attention stores a block's keys transposed ([head_dim, block_size]
    per head; its "vec" kernels do) or as rows like the values. Found by letting vLLM's own
    cache-write op (with the kernel it picks for this CPU, dtype and block size) write one
    block of known keys and values; a packing that is neither is refused, naming the kernel."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kv_manager.transfer.local_pool import torch_dtype

    dtype = torch_dtype(layout)
    heads, bs, dim = layout.num_kv_heads, layout.block_size, layout.head_dim
    isa = _get_attn_isa(dtype, bs, dim, kv_cache_dtype)
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(bs, heads, dim, generator=gen).to(dtype) for _ in range(2))
    cache = torch.zeros(1, heads, 2 * bs, dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, torch.arange(bs), isa)
    raw = cache.view(heads, 2, bs * dim)
    if torch.equal(raw[:, 1].view(heads, bs, dim), values.permute(1, 0, 2)):
        if torch.equal(raw[:, 0].view(heads, dim, bs), keys.permute(1, 2, 0)):
            return True
        if torch.equal(raw[:, 0].view(heads, bs, dim), keys.permute(1, 0, 2)):
            return False
    raise ConfigError(
        f"KV connector: vLLM's CPU attention kernel {isa!r} ({layout.dtype}, block_size {bs}) packs "
        "its KV cache in a layout this connector does not move"
    )


class KVBridge:
    """See the module docstring. Built by `bridge_for`; used on the engine's loop thread."""

    def __init__(self, layout: KVLayout, worker_id: str, *, device: str, shareable: bool,
                 staging_mb: int, lease_ttl_s: float, kv_cache_dtype: str = "auto") -> None:
        self.layout = layout
        self.worker_id = worker_id
        self.importer = KVImporterImpl(layout)
        self.staging: KVPoolMemory | None = None
        self.exporter: KVExporterImpl | None = None
        self._free: list[int] = []
        self._layers: list[torch.Tensor] = []  # vLLM's per-layer caches, [blocks, heads, 2, block_size * head_dim]
        self._keys_transposed = False  # keys as [head_dim, block_size] per block and head
        self._kv_cache_dtype = kv_cache_dtype
        self._layer_index: dict[str, int] = {}
        self.closed = False
        if shareable:
            num_blocks = staging_mb * MiB // layout.block_nbytes
            if num_blocks <= 0:
                raise ConfigError(
                    f"kv_staging_mb: {staging_mb} MiB holds no block of {layout.block_nbytes} bytes"
                )
            self.staging = allocate_pool(layout, num_blocks, device, shareable=True)
            self.exporter = KVExporterImpl(self.staging, layout, worker_id, lease_ttl_s)
            self._free = list(range(num_blocks - 1, -1, -1))

    # -- staging blocks (scheduler half) ----------------------------------------------
    @property
    def staging_blocks(self) -> int:
        return self.staging.num_blocks if self.staging is not None else 0

    def reserve(self, n: int) -> list[int] | None:
        """`n` free staging blocks, or None while leases hold too many of them."""
        if len(self._free) < n:
            self.reclaim()
        if len(self._free) < n:
            return None
        taken, self._free = self._free[-n:], self._free[:-n]
        return taken

    def unreserve(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def reclaim(self) -> None:
        """Return the staging blocks of released or expired leases to the free list."""
        if self.exporter is not None:
            for blocks in self.exporter.poll_released():
                self._free.extend(blocks)

    def held_blocks(self) -> int:
        return self.exporter.held_blocks() if self.exporter is not None else 0

    def revoke(self, request_id: str) -> None:
        """End the lease of a prefill the router will not hand over; its staging blocks are free."""
        if self.exporter is not None:
            for blocks in self.exporter.revoke(request_id):
                self._free.extend(blocks)

    def num_leases(self) -> int:
        return self.exporter.num_leases() if self.exporter is not None else 0

    # -- vLLM's cache (worker half) ------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's per-layer caches, in layer order. vLLM's CPU attention keeps a layer as
        [blocks, kv_heads, block_size, 2 * head_dim]: per block and head, the keys then the
        values (`cpu_attn.py`), each block_size * head_dim elements, the values as
        [block_size, head_dim] and the keys in the order its kernel for this CPU writes them
        (`probe_key_order`)."""
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        lay = self.layout
        if len(names) != lay.num_layers:
            raise ConfigError(f"vLLM has {len(names)} KV cache layers, the model {lay.num_layers}")
        layers = []
        for name in names:
            t = kv_caches[name]
            shape = (lay.num_kv_heads, lay.block_size, 2 * lay.head_dim)
            if t.device.type != "cpu" or t.dim() != 4 or tuple(t.shape[1:]) != shape or not t.is_contiguous():
                raise ConfigError(
                    f"KV connector: vLLM's cache of {name} is {tuple(t.shape)} on {t.device}; this "
                    f"connector moves vLLM's CPU layout [blocks, {shape[0]}, {shape[1]}, {shape[2]}] only"
                )
            layers.append(t.view(t.shape[0], lay.num_kv_heads, 2, lay.block_size * lay.head_dim))
        self._keys_transposed = probe_key_order(lay, self._kv_cache_dtype)
        self._layers = layers
        self._layer_index = {name: i for i, name in enumerate(names)}

    def layer_index(self, layer_name: str) -> int | None:
        return self._layer_index.get(layer_name)

    def stage_layer(self, layer: int, vllm_blocks: torch.Tensor, staging_blocks: torch.Tensor) -> None:
        """Copy one layer of vLLM blocks into staging blocks ([2, block_size, heads, dim] each)."""
        assert self.staging is not None
        lay = self.layout
        n, heads, bs, dim = len(vllm_blocks), lay.num_kv_heads, lay.block_size, lay.head_dim
        src = self._layers[layer].index_select(0, vllm_blocks)  # n, heads, 2, bs * dim
        if self._keys_transposed:
            keys = src[:, :, 0].view(n, heads, dim, bs).permute(0, 3, 1, 2)
        else:
            keys = src[:, :, 0].view(n, heads, bs, dim).permute(0, 2, 1, 3)
        self.staging.tensor[staging_blocks, layer, 0] = keys
        self.staging.tensor[staging_blocks, layer, 1] = src[:, :, 1].view(n, heads, bs, dim).permute(0, 2, 1, 3)

    def load(self, desc: KVDescriptor, src_blocks: Sequence[int], vllm_blocks: Sequence[int]) -> None:
        """Copy a peer's leased blocks (all layers) into vLLM blocks; raises `KVTransferError`."""
        part = dataclasses.replace(desc, block_ids=tuple(src_blocks))
        dst = torch.tensor(list(vllm_blocks), dtype=torch.long)
        bs, dim = self.layout.block_size, self.layout.head_dim
        key_shape, key_order = ((dim, bs), (0, 2, 3, 1)) if self._keys_transposed else ((bs, dim), (0, 2, 1, 3))

        def copy(peer: torch.Tensor, src_ids: list[int]) -> None:
            src = torch.tensor(src_ids, dtype=torch.long)
            for i, layer in enumerate(self._layers):  # two passes: gather the peer's blocks, scatter
                block = peer[:, i].index_select(0, src)  # n, 2, bs, heads, dim
                layer[:, :, 0].unflatten(-1, key_shape).index_copy_(0, dst, block[:, 0].permute(*key_order))
                layer[:, :, 1].unflatten(-1, (bs, dim)).index_copy_(0, dst, block[:, 1].permute(0, 2, 1, 3))

        self.importer.read(part, copy)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.exporter is not None:
            self.exporter.close()
        if self.staging is not None:
            self.staging.close()
        self.importer.close()
        self._layers = []
        with _LOCK:
            if _BRIDGES.get(self.worker_id) is self:
                del _BRIDGES[self.worker_id]


def bridge_for(vllm_config, extra: dict) -> KVBridge:
    """The bridge of the worker named in the connector's `kv_connector_extra_config`
    (`worker_id`, `model_id`, `shareable_kv`, `kv_staging_mb`, `lease_ttl_s`), built by
    whichever half of the connector comes first."""
    pc = vllm_config.parallel_config
    if pc.world_size != 1:
        raise ConfigError(
            f"KV connector: tensor/pipeline parallel world size {pc.world_size}; the Trident "
            "connector needs vLLM's scheduler and its one worker in the same process"
        )
    worker_id = str(extra["worker_id"])
    with _LOCK:
        bridge = _BRIDGES.get(worker_id)
        if bridge is None:
            bridge = KVBridge(
                kv_layout(vllm_config, str(extra["model_id"])), worker_id,
                device=str(extra.get("device", "cpu")), shareable=bool(extra.get("shareable_kv")),
                staging_mb=int(extra.get("kv_staging_mb", 128)), lease_ttl_s=float(extra.get("lease_ttl_s", 30.0)),
                kv_cache_dtype=vllm_config.cache_config.cache_dtype,
            )
            _BRIDGES[worker_id] = bridge
        return bridge


def find_bridge(worker_id: str) -> KVBridge | None:
    """The live bridge of a worker (the engine's view: stats, submit checks, shutdown)."""
    with _LOCK:
        return _BRIDGES.get(worker_id)
