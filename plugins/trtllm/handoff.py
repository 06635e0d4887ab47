"""The lease side of a TensorRT-LLM handoff: descriptors out of a prefill worker, checks and
releases on a decode worker. Used by `TrtllmEngine` on its loop thread.

TensorRT-LLM's cache transceiver moves the KV; Trident's lease protocol bounds it:

- Prefill (`shareable_kv`): when a `hold_kv` (context-only) request finishes, `export()`
  takes a lease through `kv_manager.transfer`'s `KVExporterImpl` and returns a descriptor
  whose pool handle carries TensorRT-LLM's `DisaggregatedParams` (`plugins.trtllm.disagg`).
  The lease's blocks are the prompt's logical block positions in a pool of
  `ceil(max_model_len / block_size)` slots that exists only for accounting: TensorRT-LLM
  owns the real blocks and frees them when its transceiver has sent them, or when the
  transfer times out (`kv_transfer_timeout_ms`, set to `lease_ttl_s`). The lease counts
  them meanwhile (`held_blocks`, `leases`), so a planner draining this worker waits for the
  handoffs in flight, and a decode worker refuses a descriptor past its expiry instead of
  asking TensorRT-LLM for KV it may already have dropped.
- Decode: `check()` opens a descriptor (Trident's fields, then the "trtllm" handle, then the
  layout fingerprint) before the request is queued; `release()` tells the prefill worker
  when the generation-only request has its KV (its first output) or has ended without it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kv_manager.hashing import hash_blocks
from kv_manager.layout import KVLayout
from kv_manager.transfer.base import KVDescriptor
from kv_manager.transfer.descriptor import decode_descriptor, encode_descriptor
from kv_manager.transfer.exporter import KVExporterImpl
from kv_manager.transfer.importer import KVImporterImpl
from plugins.trtllm import disagg
from trident.core.errors import KVTransferError, ValidationError
from trident.core.types import GenerateRequest

logger = logging.getLogger(__name__)


class _AccountingPool:
    """What `KVExporterImpl` needs of a pool, for blocks that live in TensorRT-LLM's cache."""

    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        import torch

        self.layout = layout
        self.num_blocks = num_blocks
        self.tensor = torch.empty(0)  # never read or written: no Trident pool holds these blocks

    def handle(self) -> bytes:
        return disagg.encode_handle(self.layout, {})

    def close(self) -> None:
        pass


class TrtllmHandoff:
    """Leases (prefill) and lease releases (decode) of one TensorRT-LLM worker. `close()`
    (the engine's shutdown; idempotent) drops the leases and the sockets."""

    def __init__(
        self,
        layout: KVLayout,
        worker_id: str,
        max_model_len: int,
        *,
        shareable: bool,
        lease_ttl_s: float,
        release_host: str = "127.0.0.1",
    ) -> None:
        self.layout = layout
        self.worker_id = worker_id
        self._exporter: KVExporterImpl | None = None
        if shareable:
            slots = -(-max_model_len // layout.block_size)
            self._exporter = KVExporterImpl(
                _AccountingPool(layout, slots),
                layout,
                worker_id,
                lease_ttl_s,
                transport="ipc" if release_host == "127.0.0.1" else "tcp",
                release_host=release_host,
            )
        self._importer = KVImporterImpl(layout, copy_threads=1)
        self._closed = False

    # -- prefill ---------------------------------------------------------------------------
    @property
    def shareable(self) -> bool:
        return self._exporter is not None

    def export(self, request_id: str, prompt: Sequence[int], disaggregated_params: Any) -> bytes:
        """Lease a finished context-only request's prompt; the descriptor bytes to return."""
        if self._exporter is None:
            raise KVTransferError(f"request_id={request_id}: this worker is not a prefill worker")
        fields = disagg.params_from_output(disaggregated_params)
        bs = self.layout.block_size
        blocks = list(range(-(-len(prompt) // bs)))
        raw = self._exporter.export(request_id, blocks, len(prompt), hash_blocks(list(prompt), bs))
        desc = dataclasses.replace(
            decode_descriptor(raw), pool_handle=disagg.encode_handle(self.layout, fields)
        )
        return encode_descriptor(desc)

    def poll(self) -> None:
        """End released and expired leases (TensorRT-LLM frees the blocks on its own)."""
        if self._exporter is not None:
            self._exporter.poll_released()

    def revoke(self, request_id: str) -> None:
        if self._exporter is not None:
            self._exporter.revoke(request_id)

    def held_blocks(self) -> int:
        return self._exporter.held_blocks() if self._exporter is not None else 0

    def num_leases(self) -> int:
        return self._exporter.num_leases() if self._exporter is not None else 0

    # -- decode ----------------------------------------------------------------------------
    def check(self, request: GenerateRequest) -> tuple[KVDescriptor, dict[str, Any]]:
        """The descriptor and generation-only `DisaggregatedParams` keyword arguments of a
        decode request; raises `ValidationError` naming the field that cannot be served."""
        if request.first_token is None:
            raise ValidationError("first_token", "required with kv_descriptor")
        try:
            desc = decode_descriptor(request.kv_descriptor or b"")
            layout, fields = disagg.decode_handle(desc.pool_handle)
            fingerprint = self.layout.fingerprint()
            if desc.fingerprint != fingerprint or layout.fingerprint() != fingerprint:
                raise KVTransferError(
                    f"KV layout mismatch: worker {desc.worker_id} has {layout.describe()}, this worker has "
                    f"{self.layout.describe()}; its KV cannot be used here"
                )
            if desc.lease_expiry <= time.time():
                raise KVTransferError(
                    f"lease {desc.lease_id} of worker {desc.worker_id} has expired"
                )
            kwargs = disagg.generation_params(fields, int(request.first_token))
        except KVTransferError as exc:
            raise ValidationError("kv_descriptor", str(exc)) from exc
        if desc.num_tokens != len(request.input_ids):
            raise ValidationError(
                "kv_descriptor",
                f"covers {desc.num_tokens} tokens, the prompt has {len(request.input_ids)}",
            )
        return desc, kwargs

    def release(self, desc: KVDescriptor) -> None:
        if not self._closed:
            self._importer.release(desc)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._exporter is not None:
            self._exporter.close()
        self._importer.close()


def layout_of(hf_config: Mapping[str, Any], block_size: int, dtype: str, model_id: str) -> KVLayout:
    """The KV layout a TensorRT-LLM worker states in its descriptors, from the checkpoint's
    config.json (Llama/Qwen/Mistral-style keys); only its fingerprint is compared."""
    try:
        layers = int(hf_config["num_hidden_layers"])
        heads = int(hf_config["num_attention_heads"])
        kv_heads = int(hf_config.get("num_key_value_heads") or heads)
        head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise KVTransferError(f"config.json: cannot read the attention shape ({exc!r})") from exc
    if dtype == "auto":
        dtype = str(hf_config.get("torch_dtype") or "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "bfloat16"
    return KVLayout(layers, kv_heads, head_dim, block_size, dtype, model_id)
