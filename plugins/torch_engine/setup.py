"""Builds what a started `TorchEngine` owns: model, KV pool, block pool, transfer ends.

Called once by `TorchEngine.start()`; `EngineParts.close()` releases everything and is safe
to call on parts that were only half built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kv_manager.block_pool import BlockPool
from kv_manager.layout import KVLayout
from kv_manager.tiers import DiskTier, HostTier
from kv_manager.tiers.base import IndexedTier
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.base import KVPoolMemory
from kv_manager.transfer.nixl import NixlPool
from plugins.base import EngineInfo
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.llama import LlamaModel
from trident.core.cluster_secret import load_secret

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineParts:
    info: EngineInfo
    model: LlamaModel
    memory: KVPoolMemory
    block_pool: BlockPool
    exporter: KVExporterImpl | None = None  # on a shareable (prefill-capable) pool
    importer: KVImporterImpl | None = None  # decode side
    tiers: list[IndexedTier] = field(default_factory=list)  # host, then disk (kv_host_mb, kv_disk_gb)
    _closers: list = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                log.exception("error while releasing engine resources")
        self._closers.clear()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_parts(cfg: TorchEngineConfig) -> EngineParts:
    from plugins.torch_engine.loader import load_checkpoint

    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(cfg.model, cfg.cache_dir)
    mc = ckpt.config
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    model = LlamaModel(mc, ckpt.weights, dtype, device, max_len, cfg.cpu_kernels, cfg.cache_dir)
    del ckpt
    dtype_name = str(dtype).removeprefix("torch.")
    layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.block_size, dtype_name, mc.model_id)
    num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_mb * 2**20 // layout.block_nbytes)
    memory = allocate_pool(layout, num_blocks, str(device), shareable=cfg.shareable_kv)
    info = EngineInfo(
        model_id=mc.model_id,
        block_size=cfg.block_size,
        num_blocks=num_blocks,
        max_model_len=max_len,
        vocab_size=mc.vocab_size,
        eos_token_ids=tuple(mc.eos_token_ids),
        kv_layout=layout,
        device=str(device),
    )
    parts = EngineParts(info, model, memory, BlockPool(num_blocks, cfg.block_size, cfg.enable_prefix_caching))
    parts._closers.append(memory.close)
    try:
        _attach_transfer(parts, cfg)
        parts.tiers = build_tiers(cfg, layout, device)
    except Exception:
        parts.close()
        raise
    log.info(
        "worker=%s: %s on %s (%s), %d KV blocks of %d tokens (%.0f MiB), ready in %.1f s",
        cfg.worker_id, mc.model_id, device, dtype_name, num_blocks, cfg.block_size,
        num_blocks * layout.block_nbytes / 2**20, time.perf_counter() - t0,
    )
    return parts


def build_tiers(cfg: TorchEngineConfig, layout: KVLayout, device: torch.device) -> list[IndexedTier]:
    """The KV tiers below the pool: host memory (`kv_host_mb`), then disk (`kv_disk_gb`,
    under `kv_disk_dir/<worker_id>/`, which survives a restart of the worker)."""
    tiers: list[IndexedTier] = []
    if cfg.kv_host_mb:
        slots = cfg.kv_host_mb * 2**20 // layout.block_nbytes
        tiers.append(HostTier(layout, max(1, slots), pin_memory=device.type == "cuda"))
    if cfg.kv_disk_gb:
        root = Path(cfg.kv_disk_dir or Path.home() / ".cache" / "trident" / "kv").expanduser() / cfg.worker_id
        tiers.append(DiskTier(layout, root, int(cfg.kv_disk_gb * 2**30), admit_after=cfg.kv_disk_admit_after))
    for tier in tiers:
        log.info("worker=%s: KV tier %s, %d blocks held at start", cfg.worker_id, tier.medium, tier.num_held)
    return tiers


def _attach_transfer(parts: EngineParts, cfg: TorchEngineConfig) -> None:
    """Every engine can import KV (from a pool on another node too, when the cluster's KV
    secret is set); a shareable pool can also export it under leases, to decode workers on
    this node (`kv_transport="local"`: shm / CUDA IPC) or on any node (`"nixl"`)."""
    layout = parts.info.kv_layout
    secret = load_secret()
    parts.importer = KVImporterImpl(layout, secret=secret)
    parts._closers.append(parts.importer.close)
    if cfg.shareable_kv:
        memory: KVPoolMemory = parts.memory
        if cfg.kv_transport == "nixl":
            memory = NixlPool(parts.memory, cfg.worker_id, secret)
            parts._closers.append(memory.close)  # closed before the pool it registers
        parts.exporter = KVExporterImpl(
            memory, layout, cfg.worker_id, cfg.lease_ttl_s,
            transport="tcp" if cfg.kv_transport == "nixl" else "ipc", release_host=cfg.kv_release_host,
        )
        parts._closers.append(parts.exporter.close)
