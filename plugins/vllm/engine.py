"""vLLM as a Trident engine: vLLM's `LLMEngine` driven on the worker's own thread.

The engine runs vLLM in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: vLLM's `InprocClient`,
so its scheduler and model runner step on our loop thread, in the worker's stub process) and
keeps the contract of `plugins.base`:

- `submit` validates the request against the model (the same checks as the torch engine)
  and queues it; the loop thread ("vllm-<worker>") adds it to vLLM as token ids with
  `output_kind=DELTA` and no detokenization (the router detokenizes), steps vLLM and turns each
  `RequestOutput` into a `TokenChunk` for the request's sink. vLLM returns the stop token (EOS
  or one of `stop_token_ids`) as the last output token; the contract leaves it out.
- `abort` is queued too; the loop thread calls vLLM's `abort_request` (vLLM frees the
  request's blocks at once) and sends the finished "abort" chunk itself, as vLLM's
  `LLMEngine` reports nothing for an aborted request.
- `stats` is the last `SchedulerStats` vLLM reported (running, waiting, KV usage, prefix-cache
  queries and hits), read through a vLLM stat logger (`plugins.vllm.stats`).
- KV events come from vLLM's own ZMQ publisher (`kv_events_config`), bound where
  `kv_events_endpoint` says; the worker glue tells the router where (`plugins.triton.events`).
  `take_events` returns nothing: there is no second copy of them.
- `shutdown` stops the loop, finishes outstanding requests with "abort" and lets vLLM free
  its KV cache and publisher. Idempotent.

Disaggregation goes through vLLM's KV connector interface, with ours as the connector
(`plugins.vllm.connector`): a `hold_kv` request (prefill worker, `shareable_kv`) leaves its
prompt staged under a lease and its last chunk carries the descriptor; a `kv_descriptor`
request (decode worker) is added to vLLM as the prompt plus `first_token`, whose KV vLLM
loads through the connector, with `max_tokens` and `min_tokens` less the first token, which
the prefill worker has already streamed. `submit` checks both before anything is queued.

Ownership: vLLM owns its KV cache and every block in it; the connector's `KVBridge` owns the
staging pool and its leases, and `shutdown` closes it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque

from plugins.base import ChunkSink, Engine, EngineInfo
from plugins.vllm.config import VllmEngineConfig
from plugins.vllm.handoff import DESCRIPTOR, HOLD, check_descriptor, check_hold, release_lease
from plugins.vllm.kv_bridge import find_bridge
from plugins.vllm.logprobs import check_mappable, output_logprobs, prompt_logprobs
from plugins.vllm.stats import SchedulerStatsLogger
from plugins.vllm.structured import check_structured
from trident.core.errors import EngineError
from trident.core.types import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineStats,
    GenerateRequest,
    TokenChunk,
)

logger = logging.getLogger(__name__)

_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORT, "error": FINISH_ERROR}


class VllmEngine(Engine):
    """See the module docstring."""

    def __init__(self, config: VllmEngineConfig) -> None:
        self.config = config.validate()
        self._llm = None  # vllm LLMEngine, built by start()
        self._info: EngineInfo | None = None
        self._stats_logger: SchedulerStatsLogger | None = None
        self._bridge = None  # plugins.vllm.kv_bridge.KVBridge, once started
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, object]] = deque()
        self._sinks: dict[str, ChunkSink] = {}  # loop thread only
        self._prompt_lens: dict[str, int] = {}
        self._prefilling: dict[str, int] = {}  # prompt tokens of requests without a first token
        self._logprobs: dict[str, tuple] = {}  # (prompt, k, prompt k or None once sent), by request
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        from plugins.vllm.setup import build_llm_engine

        self._stats_logger = SchedulerStatsLogger()
        self._llm, self._info = build_llm_engine(self.config, self._stats_logger)
        self._stats_logger.total_blocks = self._info.num_blocks
        self._bridge = find_bridge(self.config.worker_id)  # built by vLLM's connector halves
        self._thread = threading.Thread(target=self._loop, name=f"vllm-{self.config.worker_id}", daemon=True)
        self._thread.start()

    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineError("engine not started")
        return self._info

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                logger.error("engine %s: loop thread did not stop within 30 s", self.config.worker_id)
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.engine_core.shutdown()  # frees the KV cache, closes vLLM's event publisher
            except Exception:
                logger.exception("engine %s: vLLM shutdown failed", self.config.worker_id)
            from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown

            ensure_kv_transfer_shutdown()  # vLLM's process-wide connector: a later engine builds its own
        if self._bridge is not None:
            self._bridge.close()  # the staging pool, its leases, the importer's mappings

    # -- any thread ----------------------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: ChunkSink) -> None:
        info = self.info()
        if self._stopping:
            raise EngineError("engine is shutting down")
        request.validate(info.vocab_size, info.max_model_len)
        if request.hold_kv:
            check_hold(request, self._bridge, info)
        if request.kv_descriptor is not None:
            check_descriptor(request, info)
        check_mappable(request)
        check_structured(request, has_tokenizer=False)  # setup.py: skip_tokenizer_init
        self._post("submit", (request, sink))

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def take_events(self) -> list:
        return []  # vLLM publishes its own (kv_events_config); see the module docstring

    def stats(self) -> EngineStats:
        if self._stats_logger is None:
            return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        stats = self._stats_logger.snapshot()
        if self._bridge is None:
            return stats
        return dataclasses.replace(stats, held_blocks=self._bridge.held_blocks(), leases=self._bridge.num_leases())

    def _post(self, kind: str, item: object) -> None:
        with self._lock:
            self._inbox.append((kind, item))
        self._wake.set()

    # -- loop thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        llm = self._llm
        try:
            _adopt_torch_threads(self.config.num_threads)
            while not self._stopping:
                self._drain_inbox()
                if not llm.has_unfinished_requests():
                    self._stats_logger.idle()
                    if self._bridge is not None:
                        self._bridge.reclaim()  # vLLM steps reclaim released leases; idle, this does
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                try:
                    outputs = llm.step()
                except Exception as exc:  # one bad step fails what is running, not the worker
                    logger.exception("engine %s: vLLM step failed", self.config.worker_id)
                    self._fail_all(f"vLLM step failed: {exc}")
                    continue
                for out in outputs:
                    self._emit(out)
                self._stats_logger.active_prefill_tokens = sum(self._prefilling.values())
        finally:
            self._drain_inbox(rejecting=True)
            for request_id in list(self._sinks):
                self._finish(request_id, (), FINISH_ABORT)

    def _drain_inbox(self, rejecting: bool = False) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                kind, item = self._inbox.popleft()
            if kind == "submit":
                request, sink = item  # type: ignore[misc]
                if rejecting:
                    sink(TokenChunk(request.request_id, (), True, FINISH_ABORT))
                else:
                    self._add(request, sink)
            elif item in self._sinks:
                self._llm.abort_request([item])
                self._finish(item, (), FINISH_ABORT)
            elif self._bridge is not None:  # a finished prefill the router will not hand over
                self._bridge.revoke(item)  # type: ignore[arg-type]

    def _add(self, request: GenerateRequest, sink: ChunkSink) -> None:
        from plugins.vllm.setup import sampling_params

        rid = request.request_id
        if rid in self._sinks:
            sink(TokenChunk(rid, (), True, FINISH_ERROR, error=f"request_id {rid!r} is already running"))
            return
        prompt, sampling, transfer = list(request.input_ids), request.sampling, None
        if request.hold_kv:
            transfer = {HOLD: True}
        elif request.kv_descriptor is not None:
            # The prefill worker sampled and streamed the first token: it is part of vLLM's
            # prompt here (its KV is computed by this worker) and counts against the limits.
            prompt.append(int(request.first_token or 0))
            sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - 1,
                                           min_tokens=max(0, sampling.min_tokens - 1), prompt_logprobs=None)
            transfer = {DESCRIPTOR: request.kv_descriptor}
            if sampling.max_tokens <= 0:  # nothing left to generate: only the lease to end
                release_lease(self._bridge, request.kv_descriptor)
                sink(TokenChunk(rid, (), True, FINISH_LENGTH, len(request.input_ids)))
                return
        try:
            self._llm.add_request(rid, {"prompt_token_ids": prompt}, sampling_params(sampling, transfer))
        except Exception as exc:
            logger.warning("engine %s: vLLM refused request %s: %s", self.config.worker_id, rid, exc)
            sink(TokenChunk(rid, (), True, FINISH_ERROR, error=f"vLLM refused the request: {exc}"))
            return
        self._sinks[rid] = sink
        self._prompt_lens[rid] = len(request.input_ids)
        if sampling.logprobs is not None or sampling.prompt_logprobs is not None:
            self._logprobs[rid] = (tuple(prompt), sampling.logprobs or 0, sampling.prompt_logprobs)
        if request.kv_descriptor is None:  # a loaded prompt is no prefill work here
            self._prefilling[rid] = len(request.input_ids)

    def _emit(self, out) -> None:
        rid = out.request_id
        if rid not in self._sinks:
            return
        completion = out.outputs[0] if out.outputs else None
        tokens = tuple(completion.token_ids) if completion is not None else ()
        if tokens:
            self._prefilling.pop(rid, None)
        if self._stats_logger is not None:
            self._stats_logger.generated_tokens += len(tokens)
        if not out.finished:
            if tokens:
                chunk = TokenChunk(rid, tokens, num_input_tokens=self._prompt_lens[rid],
                                   cached_tokens=out.num_cached_tokens or 0)
                self._sinks[rid](self._with_logprobs(rid, chunk, out, completion))
            return
        reason = _FINISH.get(completion.finish_reason if completion is not None else "", FINISH_STOP)
        if reason == FINISH_STOP and tokens and not isinstance(completion.stop_reason, str):
            tokens = tokens[:-1]  # the contract: the stop token (EOS or stop_token_ids) is not output
        descriptor = (out.kv_transfer_params or {}).get(DESCRIPTOR)  # a hold_kv request's lease
        extra = self._with_logprobs(rid, TokenChunk(rid, tokens), out, completion) if rid in self._logprobs else None
        self._finish(rid, tokens, reason, out.num_cached_tokens or 0, kv_descriptor=descriptor, extra=extra)

    def _with_logprobs(self, rid: str, chunk: TokenChunk, out, completion) -> TokenChunk:
        """`chunk` with the logprobs vLLM returned for it (its tokens, and the prompt's once)."""
        wanted = self._logprobs.get(rid)
        if wanted is None:
            return chunk
        prompt, k, prompt_k = wanted
        values = output_logprobs(chunk.output_ids, completion.logprobs if completion is not None else None, k)
        if getattr(out, "prompt_logprobs", None) and prompt_k is not None:
            values.update(prompt_logprobs(prompt, out.prompt_logprobs, prompt_k))
            self._logprobs[rid] = (prompt, k, None)
        return dataclasses.replace(chunk, **values)

    def _finish(self, rid: str, tokens: tuple[int, ...], reason: str, cached: int = 0, error: str | None = None,
                kv_descriptor: bytes | None = None, extra: TokenChunk | None = None) -> None:
        sink = self._sinks.pop(rid)
        prompt_len = self._prompt_lens.pop(rid, 0)
        self._prefilling.pop(rid, None)
        self._logprobs.pop(rid, None)
        chunk = TokenChunk(rid, tokens, True, reason, prompt_len, cached, error, kv_descriptor)
        if extra is not None:  # the logprobs of these tokens
            chunk = dataclasses.replace(
                chunk, logprobs=extra.logprobs, top_logprobs=extra.top_logprobs,
                prompt_logprobs=extra.prompt_logprobs, prompt_top_logprobs=extra.prompt_top_logprobs,
            )
        try:
            sink(chunk)
        except Exception:
            logger.exception("engine %s: sink of %s failed", self.config.worker_id, rid)

    def _fail_all(self, message: str) -> None:
        for rid in list(self._sinks):
            try:
                self._llm.abort_request([rid])
            except Exception:
                pass
            self._finish(rid, (), FINISH_ERROR, error=message)


def _adopt_torch_threads(num_threads: int) -> None:
    """OpenMP's thread count is per thread: give this (loop) thread `num_threads`, or torch's
    global count, which vLLM's CPU attention sizes its metadata by (a mismatch fails every
    step: "Check failed: input->metadata->thread_num == thread_num"). In process, vLLM binds
    no threads (`VLLM_CPU_OMP_THREADS_BIND` is applied by its multiprocess executor only) but
    replaces `torch.set_num_threads` with a no-op; the original is `torch._C.set_num_threads`."""
    import torch

    torch._C.set_num_threads(num_threads or torch.get_num_threads())
