"""TensorRT-LLM as a Trident engine: the LLM API's `generate_async` on an asyncio loop of the
engine's own thread, behind the contract of `plugins.base`.

Threads:
- `start()` (the caller's thread) builds TensorRT-LLM's `LLM` (`plugins.trtllm.setup`), then
  starts the loop thread ("trtllm-<worker>"), which runs an asyncio event loop for good.
  TensorRT-LLM binds each request's result queue to the loop it is created on, so every
  call into the `LLM` after start happens on that loop.
- `submit()` (any thread) validates the request and translates it (`sampling`,
  `handoff.check`), raising `ValidationError` naming the field, then schedules it on the
  loop, where one task per request iterates `generate_async(..., streaming=True)` and turns
  each `RequestOutput` into a chunk for the request's sink (`outputs.OutputTracker`).
- `abort()` (any thread) schedules `RequestOutput.abort()`; the finished "abort" chunk is
  sent at once and TensorRT-LLM's later outputs for it are not.
- A pump task on the loop drains TensorRT-LLM's KV cache events (translated by
  `events.KvEventTranslator`, handed out by `take_events()`) and iteration stats
  (`stats.StatsTracker`, read by `stats()`), and ends released or expired leases, every
  `stats_interval_s`.
- `shutdown()` (any thread; twice, or on a half-started engine, is fine) finishes what is in
  flight with "abort", stops the loop and the thread, then shuts TensorRT-LLM down.

Disaggregation (`cache_transceiver` set): a `hold_kv` request is a `context_only` request;
its last chunk carries a descriptor holding TensorRT-LLM's `DisaggregatedParams` under a
Trident lease (`plugins.trtllm.handoff`). A `kv_descriptor` request is a `generation_only`
request with the same prompt; TensorRT-LLM's cache transceiver fetches the KV from the
prefill worker, and its outputs begin with the first token, which is not sent again.

Ownership: TensorRT-LLM owns its KV cache and every block in it; the engine owns the leases
that account for prefilled KV awaiting a transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from plugins.base import ChunkSink, Engine, EngineInfo
from plugins.trtllm.config import TrtllmEngineConfig
from plugins.trtllm.disagg import CONTEXT_ONLY
from plugins.trtllm.events import KvEventTranslator
from plugins.trtllm.handoff import TrtllmHandoff
from plugins.trtllm.outputs import OutputTracker
from plugins.trtllm.sampling import trtllm_sampling_kwargs
from plugins.trtllm.stats import StatsTracker
from trident.core.errors import EngineError, TridentError, ValidationError
from trident.core.types import FINISH_LENGTH, EngineStats, GenerateRequest, TokenChunk

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Request:
    request: GenerateRequest
    sink: ChunkSink
    tracker: OutputTracker
    descriptor: Any = None  # a decode request's KVDescriptor, until its lease is released
    result: Any = None  # TensorRT-LLM's RequestOutput
    task: asyncio.Task | None = None
    generated: int = 0


class TrtllmEngine(Engine):
    """See the module docstring."""

    def __init__(self, config: TrtllmEngineConfig) -> None:
        self.config = config.validate()
        self._llm: Any = None
        self._api: Any = None  # tensorrt_llm's request classes (plugins.trtllm.setup.api)
        self._info: EngineInfo | None = None
        self._handoff: TrtllmHandoff | None = None
        self._translator = KvEventTranslator(config.block_size)
        self._stats = StatsTracker(config.block_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pump_task: asyncio.Task | None = None
        self._requests: dict[str, _Request] = {}  # loop thread only
        self._events: list = []
        self._events_lock = threading.Lock()
        self._lock = threading.Lock()  # _stopping against scheduling onto the loop
        self._stopping = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None or self._closed:
            return
        from plugins.trtllm import setup

        self._llm, info = setup.build_llm(self.config)
        self._api = setup.api()
        self._handoff = TrtllmHandoff(
            info.kv_layout,
            self.config.worker_id,
            info.max_model_len,
            shareable=self.config.shareable_kv,
            lease_ttl_s=self.config.lease_ttl_s,
            release_host=self.config.kv_release_host,
        )
        self._info = info
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"trtllm-{self.config.worker_id}", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_pump(), self._loop).result(timeout=60)

    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineError("engine not started")
        return self._info

    def shutdown(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = self._stopping = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._finish_all(), loop).result(timeout=30)
            except Exception:
                logger.exception(
                    "engine %s: finishing requests at shutdown failed", self.config.worker_id
                )
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if thread.is_alive():
                logger.error(
                    "engine %s: loop thread did not stop within 30 s", self.config.worker_id
                )
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:
                logger.exception("engine %s: TensorRT-LLM shutdown failed", self.config.worker_id)
        if self._handoff is not None:
            self._handoff.close()
        if loop is not None and not (thread is not None and thread.is_alive()):
            loop.close()

    # -- any thread ----------------------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: ChunkSink) -> None:
        info = self.info()
        if self._stopping:
            raise EngineError("engine is shutting down")
        request.validate(info.vocab_size, info.max_model_len)
        kwargs = trtllm_sampling_kwargs(
            request.sampling,
            info.eos_token_ids,
            secrets.randbits(63),
            guided_decoding=bool(self.config.guided_decoding_backend),
        )
        disagg: dict[str, Any] | None = None
        descriptor = None
        handoff = self._handoff
        if request.hold_kv:
            if handoff is None or not handoff.shareable:
                raise ValidationError(
                    "hold_kv",
                    "this TensorRT-LLM worker is not a prefill worker (shareable_kv=false)",
                )
            disagg = {"request_type": CONTEXT_ONLY}
        elif request.kv_descriptor is not None:
            if handoff is None or not self.config.disaggregated:
                raise ValidationError(
                    "kv_descriptor", "this TensorRT-LLM worker has no cache transceiver"
                )
            descriptor, disagg = handoff.check(request)
        self._schedule(self._admit, request, sink, kwargs, disagg, descriptor)

    def abort(self, request_id: str) -> None:
        try:
            self._schedule(self._abort, request_id)
        except EngineError:
            pass  # shutting down: every request is being finished with "abort" anyway

    def take_events(self) -> list:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def stats(self) -> EngineStats:
        return self._stats.snapshot()

    def _schedule(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._stopping or self._loop is None:
                raise EngineError(
                    "engine is shutting down" if self._stopping else "engine not started"
                )
            self._loop.call_soon_threadsafe(fn, *args)

    # -- loop thread ---------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

    async def _start_pump(self) -> None:
        """Read the "created" KV events TensorRT-LLM emits at start (how many blocks it
        allocated: `info().num_blocks`), then start the pump."""
        if self.config.kv_event_buffer:
            events = await _drain(self._llm.get_kv_cache_events_async(timeout=1))
            self._add_events(self._translator.translate(_as_dict(e) for e in events))
            if self._translator.num_blocks and self._info is not None:
                self._info = dataclasses.replace(self._info, num_blocks=self._translator.num_blocks)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _admit(
        self,
        request: GenerateRequest,
        sink: ChunkSink,
        kwargs: dict[str, Any],
        disagg: dict[str, Any] | None,
        descriptor: Any,
    ) -> None:
        rid = request.request_id
        info = self.info()
        if rid in self._requests:
            sink(TokenChunk(rid, (), True, "error", error=f"request_id {rid!r} is already running"))
            return
        first = request.first_token if request.kv_descriptor is not None else None
        tracker = OutputTracker(
            rid,
            len(request.input_ids),
            info.eos_token_ids,
            ignore_eos=request.sampling.ignore_eos,
            first_token=first,
            logprobs=request.sampling.logprobs,
        )
        state = _Request(request, sink, tracker, descriptor)
        self._requests[rid] = state
        state.task = asyncio.get_running_loop().create_task(self._serve(state, kwargs, disagg))

    async def _serve(
        self, state: _Request, kwargs: dict[str, Any], disagg: dict[str, Any] | None
    ) -> None:
        rid, error = state.request.request_id, None
        try:
            params = self._api.DisaggregatedParams(**disagg) if disagg is not None else None
            state.result = self._llm.generate_async(
                list(state.request.input_ids),
                sampling_params=self._api.sampling_params(kwargs, self.info().vocab_size),
                streaming=True,
                disaggregated_params=params,
            )
            async for out in state.result:
                chunk = state.tracker.update(out)
                self._release(state)  # a generation-only request has its KV once it has an output
                if chunk is not None:
                    self._deliver(
                        state, self._with_descriptor(state, chunk) if chunk.finished else chunk
                    )
                if state.tracker.finished:
                    break
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the request fails, not the worker
            logger.warning(
                "engine %s: request %s failed in TensorRT-LLM: %s", self.config.worker_id, rid, exc
            )
            error = f"TensorRT-LLM failed the request: {exc}"
        finally:
            if not state.tracker.finished:
                self._deliver(state, state.tracker.abort_chunk(error))
            self._release(state, ended=True)
            if self._requests.get(rid) is state:
                del self._requests[rid]

    def _with_descriptor(self, state: _Request, chunk: TokenChunk) -> TokenChunk:
        """A finished context-only request's last chunk, with its leased descriptor."""
        if (
            not state.request.hold_kv
            or chunk.finish_reason != FINISH_LENGTH
            or self._handoff is None
        ):
            return chunk
        try:
            descriptor = self._handoff.export(
                chunk.request_id, state.request.input_ids, state.tracker.disaggregated_params
            )
        except TridentError as exc:
            logger.warning(
                "engine %s: no KV descriptor for %s: %s",
                self.config.worker_id,
                chunk.request_id,
                exc,
            )
            return dataclasses.replace(
                chunk, finish_reason="error", error=f"KV handoff failed: {exc}"
            )
        return dataclasses.replace(chunk, kv_descriptor=descriptor)

    def _deliver(self, state: _Request, chunk: TokenChunk) -> None:
        state.generated += len(chunk.output_ids)
        if chunk.finished:
            self._stats.finished(chunk.num_input_tokens, chunk.cached_tokens, state.generated)
        try:
            state.sink(chunk)
        except Exception:
            logger.exception(
                "engine %s: sink of %s failed", self.config.worker_id, chunk.request_id
            )

    def _release(self, state: _Request, ended: bool = False) -> None:
        """End a decode request's lease once TensorRT-LLM has fetched its KV (the request has
        an output) or the request has ended."""
        if state.descriptor is not None and (ended or state.tracker.sent or state.tracker.finished):
            descriptor, state.descriptor = state.descriptor, None
            self._handoff.release(descriptor)

    def _abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            if self._handoff is not None:  # a finished prefill the router will not hand over
                self._handoff.revoke(request_id)
            return
        self._cancel(state)

    def _cancel(self, state: _Request) -> None:
        if state.result is not None:
            try:
                state.result.abort()
            except Exception:
                logger.exception(
                    "engine %s: abort of %s failed", self.config.worker_id, state.request.request_id
                )
        if not state.tracker.finished:
            self._deliver(state, state.tracker.abort_chunk())
        state.tracker.finished = True
        self._release(state, ended=True)
        if state.task is not None:
            state.task.cancel()

    async def _finish_all(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        tasks = [s.task for s in self._requests.values() if s.task is not None]
        for state in list(self._requests.values()):
            self._cancel(state)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self) -> None:
        llm, interval = self._llm, self.config.stats_interval_s
        while True:
            events = (
                await _drain(llm.get_kv_cache_events_async(timeout=0))
                if self.config.kv_event_buffer
                else []
            )
            self._add_events(self._translator.translate(_as_dict(e) for e in events))
            self._stats.total_blocks = self._translator.num_blocks or self._stats.total_blocks
            self._stats.record(_as_dict(s) for s in await _drain(llm.get_stats_async(timeout=0.01)))
            self._publish_stats()
            await asyncio.sleep(interval)

    def _add_events(self, events: list) -> None:
        if events:
            with self._events_lock:
                self._events += events

    def _publish_stats(self) -> None:
        running = [s for s in self._requests.values() if s.tracker.sent or s.tracker.finished]
        waiting = [s for s in self._requests.values() if not (s.tracker.sent or s.tracker.finished)]
        prefill = sum(len(s.request.input_ids) for s in waiting if s.request.kv_descriptor is None)
        handoff = self._handoff
        self._stats.publish(
            len(running),
            len(waiting),
            prefill,
            handoff.held_blocks() if handoff else 0,
            handoff.num_leases() if handoff else 0,
        )
        if handoff is not None:
            handoff.poll()


async def _drain(results: Any) -> list:
    """What one of TensorRT-LLM's async stats/event iterators has now; it ends, or raises a
    timeout or queue-empty error, once it has nothing more."""
    items: list = []
    try:
        async for item in results:
            items.append(item)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # TimeoutError, QueueEmpty: nothing more now
        if not isinstance(exc, (TimeoutError, asyncio.TimeoutError, asyncio.QueueEmpty)):
            logger.debug("TensorRT-LLM stats/events not read: %r", exc)
    return items


def _as_dict(item: Any) -> Any:
    """TensorRT-LLM hands stats and events as dicts (older releases: JSON strings)."""
    if isinstance(item, str):
        try:
            return json.loads(item)
        except ValueError:
            return {}
    return item
