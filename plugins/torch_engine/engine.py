"""The reference PyTorch engine: `plugins.base.Engine` over a paged KV pool.

Threads: `submit`, `abort`, `take_events` and `stats` may be called from any thread (a
Triton model's `execute`, a BLS thread); they only touch the inbox and snapshots under a
lock. One loop thread, started by `start()`, owns the scheduler, the KV-cache manager and
its block pool, the model and the KV pool, and calls the request sinks. One more thread, the
KV loader's, pulls a decode request's prompt KV from the prefill worker (the only user of the
importer) into blocks the manager reserved, while the loop keeps stepping; the loop finds
finished pulls at its next `schedule()`. With KV tiers (`kv_host_mb`, `kv_disk_gb`), the
manager's `TieredCache` adds two more: offload (copies blocks down) and onboard (copies a
prefix back up), found the same way. `shutdown()` joins the loop, which waits for the
loader before the pool is released.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import replace

import torch

from kv_manager.kv_cache_manager import KVCacheManager, KVLoad, ThreadedKVLoader
from kv_manager.tiers.cache import TieredCache
from plugins.base import ChunkSink, Engine, EngineInfo
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.grammar import EngineGrammar
from plugins.torch_engine.runner import ModelRunner
from plugins.torch_engine.sampler import make_state
from plugins.torch_engine.scheduler import Scheduler
from plugins.torch_engine.sequence import SeqStatus, Sequence
from plugins.torch_engine.setup import EngineParts, build_parts
from trident.core.errors import EngineError, ValidationError
from trident.core.types import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStats,
    GenerateRequest,
    TokenChunk,
)

log = logging.getLogger(__name__)


class TorchEngine(Engine):
    """See `plugins.base` for the contract and this module's docstring for threads."""

    def __init__(self, config: TorchEngineConfig | None = None) -> None:
        self.config = (config or TorchEngineConfig()).validate()
        self._parts: EngineParts | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[tuple[str, object]] = deque()
        self._events: list = []
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._seqs: dict[str, Sequence] = {}  # loop thread only
        self._kv: KVCacheManager | None = None
        self._counters = {"prompt": 0, "cached": 0, "generated": 0}
        self._grammar: EngineGrammar | None = None  # structured outputs (set by start)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.config.num_threads:
            # Also on the starting thread (a worker stub's main thread): set only on the loop
            # thread, the CPU kernels still used every core (measured: a prefill worker then
            # slowed a decode worker's steps 3x on a 2-core machine).
            torch.set_num_threads(self.config.num_threads)
        self._parts = build_parts(self.config)
        p = self._parts
        loader = ThreadedKVLoader(self._pull_kv, on_done=self._wake.set, name=f"kv-load-{self.config.worker_id}")
        tiers = None
        if p.tiers:
            tiers = TieredCache(p.tiers, p.memory.tensor, on_done=self._wake.set, name=f"kv-{self.config.worker_id}")
        self._kv = KVCacheManager(p.block_pool, loader, tiers, self.config.kv_offload)
        self.scheduler = Scheduler(self._kv, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = ModelRunner.for_engine(p.model, p.memory.tensor, self.config, p.info.max_model_len)
        info = p.info
        self._grammar = EngineGrammar(self.config.model, info.vocab_size, info.eos_token_ids, self.config.max_num_seqs)
        self.runner.logits_hook = self._grammar.mask
        self._publish_stats()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.config.worker_id}", daemon=True)
        self._thread.start()

    def info(self) -> EngineInfo:
        if self._parts is None:
            raise EngineError("engine not started")
        return self._parts.info

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.error("engine %s: loop thread did not stop within 30 s", self.config.worker_id)
        if self._kv is not None and (self._thread is None or not self._thread.is_alive()):
            self._kv.close()  # done by the loop already; here for a half-started engine
        if self._parts is not None:
            self._parts.close()

    # -- any thread -------------------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: ChunkSink) -> None:
        info = self.info()
        if self._stopping:
            raise EngineError("engine is shutting down")
        request.validate(info.vocab_size, info.max_model_len)
        need = len(request.input_ids) // info.block_size + 1  # the prompt and its first output
        if need > info.num_blocks:
            raise ValidationError("input_ids", f"the prompt needs {need} KV blocks, the pool holds {info.num_blocks}")
        if request.kv_descriptor is not None and request.first_token is None:
            raise ValidationError("first_token", "required with kv_descriptor")
        if self._grammar is not None:
            self._grammar.check(request.sampling.structured_outputs, request.sampling.min_tokens)  # compiled here
        self._post("submit", (request, sink))

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def take_events(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events

    def stats(self) -> EngineStats:
        return self._stats

    def _post(self, kind: str, item: object) -> None:
        with self._lock:
            self._inbox.append((kind, item))
        self._wake.set()

    # -- loop thread ------------------------------------------------------------------
    def _loop(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        try:
            while not self._stopping:
                self._drain_inbox()
                self._reclaim_leases()
                if not self.scheduler.has_work():
                    self._publish_stats()
                    self._wake.wait(0.05 if self._parts and self._parts.exporter else 1.0)
                    self._wake.clear()
                    continue
                self._step()
        finally:
            for seq in list(self._seqs.values()):
                self._finish(seq, FINISH_ABORT)
            self._drain_inbox(reject=True)
            self._reclaim_leases()
            if self._kv is not None:
                self._kv.close()  # waits for a pull in flight, then frees its blocks
            self._publish_stats()

    def _drain_inbox(self, reject: bool = False) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "submit":
                request, sink = item  # type: ignore[misc]
                if reject or request.request_id in self._seqs:
                    finish, why = (FINISH_ABORT, "engine is shutting down") if reject else (FINISH_ERROR, "duplicate request_id")
                    _safe_send(sink, TokenChunk(request.request_id, (), True, finish, error=why))
                    continue
                self._add(request, sink)
            elif kind == "abort":
                seq = self._seqs.get(item)  # type: ignore[arg-type]
                if seq is not None:
                    self._finish(seq, FINISH_ABORT)
                else:  # a finished prefill whose descriptor the router will not hand over
                    self._revoke(item)  # type: ignore[arg-type]

    def _add(self, request: GenerateRequest, sink: ChunkSink) -> None:
        info = self.info()
        tokens = list(request.input_ids)
        state = make_state(request.sampling, info.eos_token_ids, request.output_offset)
        seq = Sequence(request, sink, state, tokens, len(tokens))
        if request.kv_descriptor is not None:
            seq.import_pending = True
            seq.token_ids.append(int(request.first_token or 0))
            seq.num_outputs = seq.num_emitted = 1  # the prefill worker already streamed it
        if self._grammar is not None and request.sampling.structured_outputs is not None:
            # Outputs produced elsewhere: a migrated request's last output_offset prompt
            # tokens, then the first token a prefill worker sampled.
            replay = list(request.input_ids[len(request.input_ids) - request.output_offset :])
            replay += seq.token_ids[len(request.input_ids) :]
            refused = self._grammar.start(request.request_id, request.sampling.structured_outputs, replay)
            if refused is not None:
                why = "the tokens generated so far do not match structured_outputs" if refused == FINISH_ERROR else None
                _safe_send(sink, TokenChunk(request.request_id, (), True, refused, len(request.input_ids), error=why))
                return
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _step(self) -> None:
        batch, failed = self.scheduler.schedule()
        for seq, exc in failed:
            log.warning("request_id=%s worker=%s: KV import failed: %s", seq.request_id, self.config.worker_id, exc)
            self._finish(seq, FINISH_ERROR, error=str(exc))
        if not batch.seqs:
            self._publish_stats()
            # Blocked waiting sequences retry soon; pulls in flight wake the loop when done.
            self._wake.wait(0.001 if self.scheduler.waiting else 0.05)
            self._wake.clear()
            return
        try:
            sampled = self.runner.run(batch)
        except Exception as exc:
            log.exception("worker=%s: step failed; failing its %d requests", self.config.worker_id, len(batch.seqs))
            for seq in batch.seqs:
                self._finish(seq, FINISH_ERROR, error=f"engine step failed: {exc}")
            return
        self.scheduler.update(batch)
        for seq, token, logprob in sampled:
            self._on_token(seq, token, logprob)
        self._publish_stats()

    def _on_token(self, seq: Sequence, token: int, logprob: tuple | None = None) -> None:
        info = self.info()
        sp = seq.request.sampling
        ended = self._grammar.on_token(seq.request_id, token) if self._grammar is not None else None
        if ended is not None:  # the grammar is complete (at its stop token), or refused the token
            self._finish(seq, ended, error="sampled a token structured_outputs refuses" if ended == FINISH_ERROR else None)
            return
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in info.eos_token_ids):
            self._finish(seq, FINISH_STOP)
            return
        if logprob is not None:
            seq.logprobs.append(logprob[0])
            seq.top_logprobs.append(logprob[1])
        seq.token_ids.append(token)
        seq.num_outputs += 1
        self._counters["generated"] += 1
        if seq.num_outputs >= sp.max_tokens or len(seq.token_ids) >= info.max_model_len:
            self._finish(seq, FINISH_LENGTH)
            return
        self._emit(seq, finished=False, reason=None)

    def _emit(self, seq: Sequence, finished: bool, reason: str | None, error: str | None = None, kv_descriptor: bytes | None = None) -> None:
        new = tuple(seq.token_ids[seq.prompt_len + seq.num_emitted :]) if seq.num_outputs > seq.num_emitted else ()
        seq.num_emitted = seq.num_outputs
        chunk = TokenChunk(seq.request_id, new, finished, reason, seq.prompt_len, seq.cached_tokens, error, kv_descriptor)
        if seq.logprobs or seq.prompt_logprobs:
            chunk = self._with_logprobs(seq, chunk)
        if not _safe_send(seq.sink, chunk) and not finished:
            self._finish(seq, FINISH_ABORT)

    @staticmethod
    def _with_logprobs(seq: Sequence, chunk: TokenChunk) -> TokenChunk:
        """`chunk` with the logprobs not yet emitted: one per new output id, and the prompt's
        on the first chunk."""
        first = seq.num_logprobs_emitted
        seq.num_logprobs_emitted = len(seq.logprobs)
        prompt: dict = {}
        if not seq.prompt_logprobs_sent and seq.prompt_logprobs:
            seq.prompt_logprobs_sent = True
            prompt = {"prompt_logprobs": tuple(seq.prompt_logprobs), "prompt_top_logprobs": tuple(seq.prompt_top_logprobs)}
        return replace(
            chunk, logprobs=tuple(seq.logprobs[first:]), top_logprobs=tuple(seq.top_logprobs[first:]), **prompt
        )

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if self._seqs.pop(seq.request_id, None) is None:
            return
        if self._grammar is not None:
            self._grammar.finish(seq.request_id)
        kv_descriptor = None
        # Only a prompt whose generation goes on (its one token reached max_tokens) is leased:
        # after EOS or a stop id as the first token nobody pulls, so its blocks are freed now.
        if seq.request.hold_kv and reason == FINISH_LENGTH and self._parts and self._parts.exporter:
            kv_descriptor = self._export(seq)
        self.scheduler.remove(seq)
        self._counters["prompt"] += seq.prompt_len
        self._counters["cached"] += seq.cached_tokens
        self._emit(seq, finished=True, reason=reason, error=error, kv_descriptor=kv_descriptor)

    # -- KV transfer --------------------------------------------------------------------
    def _export(self, seq: Sequence) -> bytes:
        """Move the prompt's blocks from the sequence to a lease (prefill side)."""
        bs = self.config.block_size
        assert self._kv is not None and self._parts is not None and self._parts.exporter is not None
        self._kv.cache_blocks(seq, seq.prompt_len // bs)
        leased = self._kv.lend(seq, -(-seq.prompt_len // bs))
        hashes = seq.hashes_upto(seq.prompt_len // bs, bs)
        return self._parts.exporter.export(seq.request_id, leased, seq.prompt_len, list(hashes))

    def _revoke(self, request_id: str) -> None:
        exporter = self._parts.exporter if self._parts else None
        if exporter is not None and self._kv is not None:
            for block_ids in exporter.revoke(request_id):
                self._kv.take_back(block_ids)

    def _reclaim_leases(self) -> None:
        exporter = self._parts.exporter if self._parts else None
        if exporter is None or self._kv is None:
            return
        for block_ids in exporter.poll_released():
            self._kv.take_back(block_ids)

    def _pull_kv(self, load: KVLoad) -> None:
        """On the KV loader's thread: pull a prompt's KV from the prefill worker's pool into
        `load.block_ids` (decode side). Raises on failure; the request then fails alone."""
        importer = self._parts.importer if self._parts else None
        if importer is None:
            raise EngineError("this worker cannot import KV (no importer)")
        pool = self.runner.pool
        if pool.is_cuda:
            torch.cuda.set_device(pool.device)  # per thread: the copy launches on this device
        desc = importer.open(load.source)
        try:
            if desc.num_tokens != load.num_tokens:
                raise ValidationError("kv_descriptor", f"covers {desc.num_tokens} tokens, the prompt has {load.num_tokens}")
            skip, n = load.skip_blocks, len(load.block_ids)
            part = replace(desc, block_ids=tuple(desc.block_ids[skip : skip + n]))
            importer.pull(part, pool, list(load.block_ids))
        finally:
            importer.release(desc)

    # -- snapshots --------------------------------------------------------------------
    def _publish_stats(self) -> None:
        sched, kv = self.scheduler, self.scheduler.kv
        # A prompt whose KV is loaded from elsewhere is no prefill work for this worker.
        prefill_tokens = sum(
            max(0, s.prompt_len - s.num_computed)
            for s in self._seqs.values()
            if not s.import_pending and s.status is not SeqStatus.WAITING_FOR_KV
        )
        exporter = self._parts.exporter if self._parts else None
        self._stats = EngineStats(
            running=len(sched.running),
            waiting=sched.num_waiting,  # WAITING_FOR_KV counts as waiting
            active_blocks=kv.num_used_blocks,
            total_blocks=kv.num_blocks,
            cached_blocks=kv.num_cached_blocks,
            active_prefill_tokens=prefill_tokens,
            prompt_tokens=self._counters["prompt"],
            cached_prompt_tokens=self._counters["cached"],
            generated_tokens=self._counters["generated"],
            preemptions=sched.num_preemptions,
            held_blocks=exporter.held_blocks() if exporter else 0,
            leases=exporter.num_leases() if exporter else 0,
            tiers=kv.tiers.counters() if kv.tiers is not None else (),
        )
        events = kv.take_events()
        if events:
            with self._lock:
                self._events.extend(events)


def _safe_send(sink: ChunkSink, chunk: TokenChunk) -> bool:
    try:
        sink(chunk)
        return True
    except Exception:
        log.exception("request_id=%s: sink failed; aborting the request", chunk.request_id)
        return False

