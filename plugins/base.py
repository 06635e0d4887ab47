"""The engine contract: what a worker model (`model_repository/decode`, `prefill`) may call.

Lifecycle, in order:

1. `engine = SomeEngine(config)` does no heavy work.
2. `engine.start()` loads weights, allocates the KV pool and starts the engine's own loop
   thread. After it returns, `info()` is valid.
3. `engine.submit(request, sink)` from any thread: validates the request (raising
   `trident.core.errors.ValidationError` at once for a bad one) and queues it. The engine loop
   thread later calls `sink(chunk)` with each `TokenChunk`; the last has `finished=True`.
   `sink` runs on the engine thread and must not block (a Triton response sender's `send`
   is fine). Exactly one finished chunk is delivered per accepted request, whatever happens
   (finish, abort, engine error, shutdown).
   A token that ends the request (EOS, one of `stop_token_ids`) is not part of any
   chunk's `output_ids`: the final chunk says "stop" instead.
4. `engine.abort(request_id)` from any thread: the request stops at the next step, its blocks
   are freed, and its sink receives a finished chunk with `finish_reason="abort"`.
5. `engine.take_events()` drains KV cache events (`kv_manager.events`) since the last call;
   `engine.stats()` returns a snapshot of load and cache counters. Both thread-safe.
6. `engine.shutdown()` stops the loop, finishes outstanding requests with "abort", and frees
   the KV pool (including shared memory). Safe to call twice and on a half-started engine.

Ownership: the engine owns its KV pool and every block in it. A prefill engine lends blocks
to a peer only under a lease (`hold_kv` requests; see `kv_manager.transfer`), and takes them
back when the lease is released or expires.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kv_manager.events import EngineEvents
from kv_manager.layout import KVLayout
from trident.core.types import EngineStats, GenerateRequest, TokenChunk

ChunkSink = Callable[[TokenChunk], None]


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model_id: str
    block_size: int
    num_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    kv_layout: KVLayout
    device: str
    # Set by an engine that publishes its own KV events (vLLM): the worker then announces
    # this stream instead of publishing `take_events()`.
    kv_events: EngineEvents | None = None


class Engine(ABC):
    """Base class of every engine plugin. See the module docstring for the contract."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def submit(self, request: GenerateRequest, sink: ChunkSink) -> None: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def take_events(self) -> list: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> Iterator[TokenChunk]:
        """Submit and iterate the request's chunks on the calling thread (tests, benchmarks)."""
        chunks: queue.Queue[TokenChunk] = queue.Queue()
        self.submit(request, chunks.put)
        while True:
            try:
                chunk = chunks.get(timeout=timeout)
            except queue.Empty:
                self.abort(request.request_id)
                raise TimeoutError(f"request {request.request_id} produced nothing for {timeout}s") from None
            yield chunk
            if chunk.finished:
                return

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
