"""`WorkerClient` over engines in this process (tests, benchmarks, single-process tools).

Same contract as the BLS client: chunks until the finished one; closing the stream early
aborts the request on the engine and waits for its final chunk.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Mapping

from plugins.base import Engine
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.types import FINISH_ERROR, GenerateRequest, TokenChunk


class EngineWorkerClient:
    """Routes `generate(worker, ...)` to `engines[worker]`. Thread-safe (engines are)."""

    def __init__(self, engines: Mapping[str, Engine], timeout_s: float = 120.0) -> None:
        self.engines = dict(engines)
        self.timeout_s = timeout_s

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        engine = self.engines.get(worker)
        if engine is None:
            raise WorkerUnavailable(f"no worker named {worker!r}")
        chunks: queue.Queue[TokenChunk] = queue.Queue()
        engine.submit(request, chunks.put)
        finished = False
        try:
            while not finished:
                chunk = chunks.get(timeout=self.timeout_s)
                finished = chunk.finished
                if chunk.finish_reason == FINISH_ERROR:
                    raise EngineError(chunk.error or f"worker {worker}: engine error")
                yield chunk
        finally:
            if not finished:
                engine.abort(request.request_id)
                while not chunks.get(timeout=self.timeout_s).finished:
                    pass

    def abort(self, worker: str, request_id: str) -> None:
        """Abort `request_id` on `worker` (no-op if it finished; a finished prefill's lease
        is revoked)."""
        engine = self.engines.get(worker)
        if engine is not None:
            engine.abort(request_id)
