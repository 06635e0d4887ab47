"""`TridentConnector`: vLLM's KV connector interface (`KVConnectorBase_V1`) over Trident's
KV transfer (`kv_manager.transfer`: shared memory on CPU, CUDA IPC on GPU; our descriptor and
leases), so that a vLLM prefill worker hands a prompt's KV to a vLLM decode worker, or to any
worker whose pool has the same layout fingerprint (the torch engine with the same block size
and dtype). Named in vLLM's `kv_transfer_config` by `plugins.vllm.setup`.

The request side speaks `kv_transfer_params` (vLLM's per-request connector field), set by
`VllmEngine` from the worker contract:

- prefill, `{HOLD: True}` (`hold_kv`): the scheduler half reserves staging blocks for the
  prompt when vLLM first considers the request (no room: the request waits until leases are
  released); each step the worker half copies the blocks the forward pass has just written,
  layer by layer (`save_kv_layer`), cached prefix blocks included. When the request finishes
  (its one token), the staged blocks are leased and the descriptor comes back in the output's
  `kv_transfer_params[DESCRIPTOR]`; vLLM frees its own blocks at once.
- decode, `{DESCRIPTOR: bytes}` with the prompt plus the prefill's first token: the scheduler
  half opens the descriptor (layout, lease, peer pool) and tells vLLM that the prompt's
  tokens beyond its own prefix-cache hit are external; the worker half copies them from the
  peer's pool into the blocks vLLM allocated, before the forward pass that computes the
  first token's successor, then releases the lease. A descriptor that cannot be opened (the
  lease expired, the peer is gone) or a copy that fails makes vLLM recompute the prompt
  (`kv_load_failure_policy="recompute"`): slower, never wrong. A request that ends before its
  load releases the lease.

Threads: both halves are called on the engine's loop thread (`KVBridge`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kv_manager.transfer.base import KVDescriptor
from plugins.vllm.handoff import DESCRIPTOR, HOLD, release_lease
from plugins.vllm.kv_bridge import KVBridge, bridge_for

logger = logging.getLogger(__name__)


@dataclass
class _Hold:
    """A prefill request's staging blocks and how much of its prompt they hold."""

    staging: list[int]
    prompt_len: int
    vllm_blocks: list[int] = field(default_factory=list)
    staged: int = 0  # prompt tokens whose whole block is staged
    complete: bool = False  # every prompt token staged


@dataclass
class _Pull:
    desc: KVDescriptor
    handed_to_worker: bool = False  # the worker half releases the lease once it has copied


@dataclass
class _Load:
    request_id: str
    desc: KVDescriptor
    src_blocks: list[int]
    vllm_blocks: list[int]


@dataclass
class TridentConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker half: blocks to stage (prefill), loads (decode)."""

    save_from: torch.Tensor | None = None  # vLLM block ids
    save_to: torch.Tensor | None = None  # staging block ids
    loads: list[_Load] = field(default_factory=list)


class TridentConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._bridge: KVBridge = bridge_for(vllm_config, self._kv_transfer_config.kv_connector_extra_config)
        self._block_size = vllm_config.cache_config.block_size
        # scheduler half
        self._holds: dict[str, _Hold] = {}
        self._pulls: dict[str, _Pull] = {}
        self._next_loads: list[_Load] = []
        # worker half
        self._failed_blocks: set[int] = set()

    # ==== scheduler half ==================================================================
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if params.get(HOLD):
            if rid not in self._holds:
                prompt_len = len(request.prompt_token_ids or ())
                staging = self._bridge.reserve(-(-prompt_len // self._block_size))
                if staging is None:
                    return None, False  # asked again next step, once leases have been released
                self._holds[rid] = _Hold(staging, prompt_len)
            return 0, False
        raw = params.get(DESCRIPTOR)
        if raw is None:
            return 0, False
        pull = self._pulls.get(rid)
        if pull is None:
            try:
                desc = self._bridge.importer.open(raw)
            except Exception as exc:
                logger.warning("request_id=%s: KV descriptor not usable (%s); vLLM recomputes the prompt", rid, exc)
                self._release_unopened(raw)
                params.pop(DESCRIPTOR, None)
                return 0, False
            pull = self._pulls[rid] = _Pull(desc)
        return max(0, pull.desc.num_tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        pull = self._pulls.get(request.request_id)
        if pull is None or pull.handed_to_worker:
            return
        if num_external_tokens <= 0:  # vLLM's own prefix cache holds the whole prompt
            self._pulls.pop(request.request_id)
            self._bridge.importer.release(pull.desc)
            return
        desc, bs = pull.desc, self._block_size
        skip = (desc.num_tokens - num_external_tokens) // bs
        end = -(-desc.num_tokens // bs)
        vllm_blocks = list(blocks.get_block_ids()[0])
        pull.handed_to_worker = True
        self._next_loads.append(_Load(request.request_id, desc, list(desc.block_ids[skip:end]), vllm_blocks[skip:end]))

    def build_connector_meta(self, scheduler_output) -> TridentConnectorMetadata:
        self._bridge.reclaim()
        meta = TridentConnectorMetadata(loads=self._next_loads)
        self._next_loads = []
        if not self._holds:
            return meta
        src: list[int] = []
        dst: list[int] = []
        for new in scheduler_output.scheduled_new_reqs:
            hold = self._holds.get(new.req_id)
            if hold is not None:
                hold.vllm_blocks = list(new.block_ids[0])
                self._plan(new.req_id, hold, new.num_computed_tokens, scheduler_output, src, dst)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            hold = self._holds.get(rid)
            if hold is None:
                continue
            added = cached.new_block_ids[i]
            if added is not None:
                if rid in cached.resumed_req_ids:
                    hold.vllm_blocks = list(added[0])
                else:
                    hold.vllm_blocks.extend(added[0])
            self._plan(rid, hold, cached.num_computed_tokens[i], scheduler_output, src, dst)
        if src:
            meta.save_from = torch.tensor(src, dtype=torch.long)
            meta.save_to = torch.tensor(dst, dtype=torch.long)
        return meta

    def _plan(self, rid: str, hold: _Hold, computed: int, scheduler_output, src: list[int], dst: list[int]) -> None:
        """Stage the blocks this step completes or touches, from the first not yet staged."""
        bs = self._block_size
        end = min(hold.prompt_len, computed + scheduler_output.num_scheduled_tokens.get(rid, 0))
        if hold.complete or end <= hold.staged:
            return
        first, last = hold.staged // bs, -(-end // bs)
        src.extend(hold.vllm_blocks[first:last])
        dst.extend(hold.staging[first:last])
        hold.staged = end - end % bs
        hold.complete = end >= hold.prompt_len

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        pull = self._pulls.pop(rid, None)
        if pull is not None and not pull.handed_to_worker:
            self._bridge.importer.release(pull.desc)
        hold = self._holds.pop(rid, None)
        if hold is None:
            return False, None
        from vllm.v1.request import RequestStatus

        # Only a prompt whose generation goes on (its one token hit the length cap) is leased:
        # after EOS or a stop id as the first token nobody pulls it.
        done = request.status == RequestStatus.FINISHED_LENGTH_CAPPED
        if not (done and hold.complete) or self._bridge.exporter is None:
            self._bridge.unreserve(hold.staging)
            return False, None
        descriptor = self._bridge.exporter.export(rid, hold.staging, hold.prompt_len, [])
        return False, {DESCRIPTOR: descriptor}

    def _release_unopened(self, raw: bytes) -> None:
        try:
            release_lease(self._bridge, raw)
        except Exception:  # unparseable: nothing to release; the lease, if any, expires
            pass

    # ==== worker half =====================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._bridge.register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TridentConnectorMetadata)
        for load in meta.loads:
            try:
                self._bridge.load(load.desc, load.src_blocks, load.vllm_blocks)
            except Exception as exc:
                logger.warning("request_id=%s: KV load from %s failed (%s); vLLM recomputes it",
                               load.request_id, load.desc.worker_id, exc)
                self._failed_blocks.update(load.vllm_blocks)
            finally:
                self._bridge.importer.release(load.desc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, TridentConnectorMetadata) or meta.save_from is None:
            return
        layer = self._bridge.layer_index(layer_name)
        if layer is not None:
            self._bridge.stage_layer(layer, meta.save_from, meta.save_to)

    def wait_for_save(self) -> None:
        return  # staging copies are synchronous, done in save_kv_layer

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
