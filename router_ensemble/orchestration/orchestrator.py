"""What the `router` model does with one request, as plain classes (no Triton import).

`Orchestrator.run` takes a validated `RouterRequest` and:

1. tokenizes it (`text_input`, or `messages` through the model's chat template, or takes
   `input_ids`);
2. asks the `WorkerSelector` for a decode worker;
3. streams the worker's `TokenChunk`s through a `WorkerClient` (BLS in production),
   detokenizing incrementally (multi-byte characters split across tokens are held back)
   and applying stop strings (text that may start one is held back too);
4. emits `RouterDelta`s: one per new piece of text when streaming, or a single one at the end
   otherwise; the last carries `finish_reason` ("stop" | "length" | "abort");
5. polls `is_cancelled` between chunks; on cancellation or a stop string it closes the
   worker stream, which aborts the request on the worker so its KV blocks are freed;
6. when a worker is lost (it died, froze, was unloaded or drained, or its node went down),
   before or during the stream, resends the request to another worker with the tokens
   generated so far (`router_ensemble.orchestration.migration`); the client sees one stream.

Threads: `run` blocks for the life of one request and is called on one request thread per
request; an `Orchestrator` holds no per-request state, so any number of requests run at once.
Disaggregation (`router_ensemble.orchestration.disagg`): after step 2 a `Disaggregator` decides whether a
prefill worker computes the prompt first; `_stream_chunks` then pumps that route's chunks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from router_ensemble.orchestration.disagg import Disaggregator, Route
from router_ensemble.orchestration.migration import Migration, resumed
from router_ensemble.orchestration.ports import WorkerClient, WorkerSelector
from router_ensemble.text.stop_strings import StopStringMatcher
from router_ensemble.text.tokenizer import IncrementalDetokenizer, Tokenizer
from trident.core.errors import EngineError, TridentError, ValidationError, WorkerAborted
from trident.core.router_io import RouterDelta, RouterRequest
from trident.core.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, GenerateRequest, TokenChunk
from trident.core.worker_io import flatten_top

logger = logging.getLogger(__name__)

Emit = Callable[[RouterDelta], None]


class _Stream:
    """Per-request output state: detokenizer, stop matcher, what is not yet emitted."""

    __slots__ = (
        "detok", "matcher", "worker", "input_tokens", "cached", "total", "text", "ids", "generated", "stopped",
        "logprobs", "top_logprobs", "prompt", "prompt_ids", "token_texts",
    )

    def __init__(self, detok: IncrementalDetokenizer, matcher: StopStringMatcher, worker: str, input_tokens: int) -> None:
        self.detok = detok
        self.matcher = matcher
        self.worker = worker
        self.input_tokens = input_tokens
        self.cached = 0
        self.total = 0
        self.text: list[str] = []
        self.ids: list[int] = []  # not yet emitted
        self.generated: list[int] = []  # every output token, from every worker that served it
        self.stopped = False
        self.logprobs: list[float] = []  # of `ids` (with SamplingParams.logprobs)
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.prompt: TokenChunk | None = None  # the chunk with the prompt logprobs, until emitted
        self.prompt_ids: tuple[int, ...] = ()  # sent with them (prompt_logprobs)
        self.token_texts: Callable[[tuple[int, ...]], tuple[str, ...]] = lambda ids: ()

    def add(self, chunk: TokenChunk) -> None:
        # (a migrated attempt's prompt holds generated tokens too: report the prompt's share)
        self.cached = max(self.cached, min(chunk.cached_tokens, self.input_tokens))
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
            self.top_logprobs.extend(chunk.top_logprobs)
        if chunk.prompt_logprobs and self.prompt_ids and self.prompt is None:
            self.prompt = chunk
        self.ids.extend(chunk.output_ids)
        self.generated.extend(chunk.output_ids)
        self.total += len(chunk.output_ids)
        if not self.stopped and chunk.output_ids:
            self._feed(self.detok.add(chunk.output_ids))

    def finish(self) -> None:
        """End of the token stream: release held-back text unless a stop string ended it."""
        if not self.stopped:
            self._feed(self.detok.flush())
        if not self.stopped:
            self.text.append(self.matcher.flush())

    def _feed(self, piece: str) -> None:
        out, hit = self.matcher.feed(piece)
        self.text.append(out)
        self.stopped = hit

    def has_text(self) -> bool:
        return any(self.text)

    def take(self, finish_reason: str = "") -> RouterDelta:
        delta = RouterDelta(
            text_output="".join(self.text),
            output_ids=tuple(self.ids),
            finish_reason=finish_reason,
            num_input_tokens=self.input_tokens,
            num_output_tokens=self.total,
            cached_tokens=self.cached,
            worker=self.worker,
            **self._take_logprobs(),
        )
        self.text.clear()
        self.ids.clear()
        return delta

    def _take_logprobs(self) -> dict[str, tuple]:
        """The logprob outputs of the ids about to be emitted, and the prompt's once."""
        out: dict[str, tuple] = {}
        texts = self.token_texts
        if self.logprobs:
            ids, lps = flatten_top(tuple(self.top_logprobs))
            out = {
                "output_logprobs": tuple(self.logprobs), "top_logprob_ids": ids, "top_logprobs": lps,
                "output_tokens": texts(tuple(self.ids)), "top_logprob_tokens": texts(ids),
            }
            self.logprobs.clear()
            self.top_logprobs.clear()
        if self.prompt_ids:
            prompt = self.prompt
            out.update(prompt_ids=self.prompt_ids, prompt_tokens=texts(self.prompt_ids))
            if prompt is not None:
                ids, lps = flatten_top(prompt.prompt_top_logprobs)
                out.update(
                    prompt_token_logprobs=prompt.prompt_logprobs, prompt_top_logprob_ids=ids,
                    prompt_top_logprobs=lps, prompt_top_logprob_tokens=texts(ids),
                )
            self.prompt_ids, self.prompt = (), None
        return out


class Orchestrator:
    """Runs router requests; see the module docstring. Shared by all request threads."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        selector: WorkerSelector,
        client: WorkerClient,
        cancel_poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        disagg: Disaggregator | None = None,
        migration: Migration | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.selector = selector
        self.client = client
        self.cancel_poll_s = cancel_poll_s
        self.clock = clock
        self.disagg = disagg  # None: every prompt is prefilled by its decode worker
        self.migration = migration or Migration()

    def prompt_ids(self, request: RouterRequest) -> tuple[int, ...]:
        if request.input_ids is not None:
            return request.input_ids
        if request.messages is not None:
            tools = {"tools": list(request.tools)} if request.tools else {}  # a template may render them
            text = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, **tools)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(request.text_input or "", add_special_tokens=True)
        if not ids:
            raise ValidationError("text_input", "the prompt tokenizes to nothing")
        return tuple(ids)

    def token_texts(self, ids: tuple[int, ...]) -> tuple[str, ...]:
        """The text of each token alone (special tokens included), for logprobs."""
        if not ids:
            return ()
        return tuple(self.tokenizer.backend.decode_batch([[i] for i in ids], skip_special_tokens=False))

    def run(self, request: RouterRequest, emit: Emit, is_cancelled: Callable[[], bool] = lambda: False) -> RouterDelta:
        """Serve one request, calling `emit` for each response; returns the final delta.

        Raises `TridentError` (validation or worker failure) before or during streaming; the
        caller turns it into a Triton error response. A worker lost on the way is replaced
        (`migration`) without the client seeing a break.
        """
        ids = self.prompt_ids(request)
        base_id = uuid.uuid4().hex
        generate = GenerateRequest(request_id=base_id, input_ids=ids, sampling=request.sampling)
        state = _Stream(self.tokenizer.detokenizer(), StopStringMatcher(request.stop), "", len(ids))
        if request.sampling.prompt_logprobs is not None:
            state.prompt_ids = ids
        if request.sampling.logprobs is not None or request.sampling.prompt_logprobs is not None:
            state.token_texts = self.token_texts
        exclude: tuple[str, ...] = ()
        moved, local_only = 0, False
        while True:
            request_id = base_id if not moved else f"{base_id}.{moved}"
            attempt = resumed(generate, request_id, tuple(state.generated)) if moved else generate
            route = self._start(request, attempt, exclude, local_only, state)
            try:
                reason = self._stream_chunks(route, attempt, state, emit if request.stream else None, is_cancelled)
                break
            except TridentError as exc:
                cause = self._migration_cause(route, state, exc, moved)
                if cause is None:
                    raise
                moved += 1
                self.migration.record(cause)
                logger.warning(
                    "request_id=%s: %s (%s); migrating after %d tokens (move %d)",
                    base_id, exc, cause, len(state.generated), moved,
                )
                if cause == "kv_handoff":
                    local_only = True  # a decode worker recomputes the prompt
                else:
                    exclude += (route.decode,)
                if len(state.generated) >= request.sampling.max_tokens:
                    reason = FINISH_LENGTH  # the lost worker had produced every token
                    break
            finally:
                route.close()
                self.selector.release(request_id)
        state.finish()
        if state.stopped:
            reason = FINISH_STOP
        final = state.take(reason)
        route.record_served(self.selector, final.num_input_tokens, final.cached_tokens)
        emit(final)
        return final

    def _start(
        self, request: RouterRequest, attempt: GenerateRequest, exclude: tuple[str, ...], local_only: bool,
        state: _Stream,
    ) -> Route:
        """Select a decode worker (outside `exclude`) and route the attempt to it."""
        t1 = self.clock()
        ids, request_id = attempt.input_ids, attempt.request_id
        selection = self.selector.select(request_id, ids, exclude)
        try:
            route = Route(selection.worker) if self.disagg is None or local_only else self.disagg.route(
                request_id, selection.worker, ids, selection.cached_tokens, attempt.sampling
            )
        except BaseException:
            self.selector.release(request_id)
            raise
        logger.debug(
            "request_id=%s client_id=%s -> worker=%s (%d prompt tokens; select %.1f ms)",
            request_id, request.request_id, route.label, len(ids), (self.clock() - t1) * 1e3,
        )
        state.worker = route.label
        return route

    def _migration_cause(self, route: Route, state: _Stream, exc: TridentError, moved: int) -> str | None:
        """Why the failed attempt moves to another worker, or None (the error then ends the
        request; when only a limit stopped it, the error says which)."""
        cause = self.migration.cause_of(exc, self.selector.is_gone(route.decode))
        if cause is None or state.stopped:
            return None
        why_not = self.migration.refusal(moved, state.input_tokens + len(state.generated))
        if why_not is not None:
            exc.args = (f"{exc} (not migrated: {why_not})",)
            return None
        return cause

    def _stream_chunks(
        self,
        route: Route,
        request: GenerateRequest,
        state: _Stream,
        emit: Emit | None,
        is_cancelled: Callable[[], bool],
    ) -> str:
        """Pump the route's chunks into `state`; return the finish reason."""
        chunks = route.chunks(self.client, request)
        next_poll = self.clock() + self.cancel_poll_s
        try:
            for chunk in chunks:
                state.worker = route.label  # changes if a gone prefill worker forced a local prefill
                state.add(chunk)
                if state.stopped:
                    return FINISH_STOP
                if chunk.finished:
                    if chunk.finish_reason == FINISH_ABORT:  # the router did not ask for it
                        raise WorkerAborted(
                            f"worker {route.label} ended request {request.request_id} on its own (it is shutting down)"
                        )
                    return chunk.finish_reason or FINISH_STOP
                if emit is not None and state.has_text():
                    emit(state.take())
                now = self.clock()
                if now >= next_poll:
                    next_poll = now + self.cancel_poll_s
                    if is_cancelled():
                        logger.info("request_id=%s cancelled by the client", request.request_id)
                        return FINISH_ABORT
        finally:
            chunks.close()  # aborts on the worker if the stream did not finish
        raise EngineError(f"worker {route.label} ended request {request.request_id} without a final response")
