"""Turning router deltas into OpenAI responses: whole JSON bodies and SSE chunk streams.

`Generation` runs the `RouterRequest`s of one HTTP request (one per prompt and choice),
merges their deltas in arrival order, keeps per-choice state and records metrics. The
route handlers in `frontend.app` own one `Generation` per request, on the event loop.
Cleanup in this module never awaits inside `finally`: when the client disconnects,
Starlette cancels the response task and every await there would be cancelled again, so
cancelling Triton streams is done by synchronous calls (`call.cancel()`, `task.cancel()`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import APIError, service_unavailable
from frontend.logprobs import CompletionLogprobs, chat_content
from frontend.metrics import FrontendMetrics
from frontend.tools import ToolCallParser, ToolPlan, collect, tool_finish_reason
from frontend.triton_client import RouterClient
from trident.core.router_io import RouterDelta, RouterRequest

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# When one choice fails, its siblings get this long to end by themselves before they are
# cancelled: a request error (context length, a bad field) fails them all at once, and a
# stream cancelled just as its error arrives makes Triton 2.51 keep a model reference.
SIBLING_GRACE_S = 1.0
_lingering: set[asyncio.Task[None]] = set()  # `_cancel_after` tasks, kept from the GC


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(slots=True)
class ChoiceState:
    """Progress of one choice (one router request)."""

    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    started: bool = False
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat: logprobs.content
    completion_logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    new_logprobs: Any = None  # what the latest delta added (a streamed chunk's logprobs)
    worker: str = ""  # the router's `worker` output: who served it ("prefill>decode" if split)


class Generation:
    """The router requests behind one OpenAI request, merged into one delta stream.

    Created by a route handler, iterated once with `deltas()` (which yields
    `(choice_index, RouterDelta)`), then read for usage. Closing `deltas()` early cancels
    every router stream still open.
    """

    def __init__(
        self,
        client: RouterClient,
        requests: list[RouterRequest],
        param_map: dict[str, str],
        metrics: FrontendMetrics,
        model: str,
        n: int,
    ) -> None:
        self.client = client
        self.requests = requests
        self.param_map = param_map
        self.metrics = metrics
        self.model = model
        self.started_at = time.monotonic()
        self.streaming = all(r.stream for r in requests)
        self.with_logprobs = any(r.sampling.logprobs is not None for r in requests)
        self.choices = [ChoiceState(index=i, prompt_index=i // n) for i in range(len(requests))]

    async def deltas(self) -> AsyncGenerator[tuple[int, RouterDelta], None]:
        source = self._single() if len(self.requests) == 1 else self._merged()
        async with aclosing(source) as stream:
            async for index, delta in stream:
                self._record(self.choices[index], delta)
                yield index, delta

    async def _single(self) -> AsyncIterator[tuple[int, RouterDelta]]:
        async with aclosing(self.client.generate(self.requests[0], self.param_map)) as stream:
            async for delta in stream:
                yield 0, delta

    async def _merged(self) -> AsyncIterator[tuple[int, RouterDelta]]:
        queue: asyncio.Queue[tuple[int, RouterDelta | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, req: RouterRequest) -> None:
            try:
                async with aclosing(self.client.generate(req, self.param_map)) as stream:
                    async for delta in stream:
                        queue.put_nowait((index, delta))
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait((index, exc))
                return
            queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self.requests)]
        failed = False
        try:
            open_streams = len(tasks)
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    failed = True
                    raise item
                else:
                    yield index, item
        finally:
            # each task's aclosing() cancels its Triton stream
            _cancel_after(tasks, SIBLING_GRACE_S if failed else 0.0)

    def _record(self, choice: ChoiceState, delta: RouterDelta) -> None:
        now = time.monotonic()
        new_tokens = max(delta.num_output_tokens - choice.completion_tokens, len(delta.output_ids))
        if new_tokens > 0 and self.streaming:  # one response per request otherwise
            if choice.first_token_at is None:
                choice.first_token_at = now
                self.metrics.ttft.observe(now - self.started_at, self.model)
            else:
                gap = now - (choice.last_token_at or now)
                self.metrics.itl.observe(gap / new_tokens, self.model, count=new_tokens)
            choice.last_token_at = now
        choice.text.append(delta.text_output)
        choice.prompt_tokens = delta.num_input_tokens or choice.prompt_tokens
        choice.cached_tokens = delta.cached_tokens or choice.cached_tokens
        choice.worker = delta.worker or choice.worker
        choice.completion_tokens = max(
            delta.num_output_tokens, choice.completion_tokens + len(delta.output_ids)
        )
        if delta.finish_reason:
            choice.finish_reason = check_finish_reason(delta.finish_reason)
        if self.with_logprobs:
            self._record_logprobs(choice, delta)

    def _record_logprobs(self, choice: ChoiceState, delta: RouterDelta) -> None:
        if self.requests[choice.index].messages is not None:  # chat
            content = chat_content(delta)
            choice.logprobs.extend(content)
            choice.new_logprobs = {"content": content} if content else None
        else:
            part = choice.completion_logprobs.add(delta, echo=bool(delta.prompt_ids))
            choice.new_logprobs = part if part["tokens"] else None

    def usage(self) -> dict[str, Any]:
        """OpenAI `usage`: prompts counted once per prompt, completions per choice."""
        prompts: dict[int, ChoiceState] = {}
        for choice in self.choices:
            prompts.setdefault(choice.prompt_index, choice)
        prompt_tokens = sum(c.prompt_tokens for c in prompts.values())
        cached = sum(c.cached_tokens for c in prompts.values())
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def served_by(self) -> dict[str, Any]:
        """Trident's extension of a response body: the workers behind each choice."""
        return {"workers": [c.worker for c in self.choices]}

    def finish(self) -> None:
        """Record the end-to-end metrics of a generation that completed."""
        self.metrics.e2e.observe(time.monotonic() - self.started_at, self.model)
        usage = self.usage()
        self.metrics.prompt_tokens.inc(self.model, amount=usage["prompt_tokens"])
        self.metrics.cached_tokens.inc(
            self.model, amount=usage["prompt_tokens_details"]["cached_tokens"]
        )
        self.metrics.completion_tokens.inc(self.model, amount=usage["completion_tokens"])


def _cancel_after(tasks: list[asyncio.Future[None]], grace_s: float) -> None:
    """Cancel the `tasks` still running, now or after `grace_s` (synchronous: it runs in
    cleanup that must not await, see the module docstring)."""
    pending = [t for t in tasks if not t.done()]
    if not grace_s:
        for task in pending:
            task.cancel()
        return
    if not pending:
        return

    async def cancel_late() -> None:
        try:
            await asyncio.wait(pending, timeout=grace_s)
        finally:
            for task in pending:
                task.cancel()  # a no-op on a task that has ended

    task = asyncio.ensure_future(cancel_late())
    _lingering.add(task)
    task.add_done_callback(_lingering.discard)


def check_finish_reason(reason: str) -> str:
    """Pass `stop`/`length` through; an abort the client did not ask for is an error."""
    if reason in ("stop", "length"):
        return reason
    if reason == "abort":
        raise service_unavailable(
            "the request was aborted by the server (worker stopped or drained)"
        )
    raise APIError(
        500, f"the engine failed the request (finish_reason={reason!r})", type="server_error"
    )


class ResponseShape:
    """Builds the JSON of one endpoint's responses and chunks (chat or text completion)."""

    def __init__(
        self, chat: bool, response_id: str, model: str, created: int, echo: list[str] | None = None
    ):
        self.chat = chat
        self.id = response_id
        self.model = model
        self.created = created
        self.echo = echo  # prompts to prepend (completions with echo=true), by prompt index
        self.tools: ToolPlan | None = None  # chat with tools: set by the route handler
        self._tool_parsers: dict[int, ToolCallParser] = {}  # by choice index, when streaming

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, generation: Generation) -> dict[str, Any]:
        choices = []
        for c in generation.choices:
            text = "".join(c.text)
            if self.echo is not None:
                text = self.echo[c.prompt_index] + text
            logprobs = None
            if generation.with_logprobs:
                logprobs = {"content": c.logprobs} if self.chat else c.completion_logprobs.body()
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None, "tool_calls": []}
                if self.tools is not None and self.tools.choice != "none":
                    parser = self.tools.parser()
                    message["content"], message["tool_calls"] = collect(parser, text)
                    c.finish_reason = tool_finish_reason(parser, c.finish_reason)
                choices.append(
                    {
                        "index": c.index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        body.update(choices=choices, usage=generation.usage(), system_fingerprint=None)
        body["trident"] = generation.served_by()
        return body

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        role: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        body["choices"] = [choice]
        return body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage)
        return body

    def tool_chunks(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        logprobs: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        """Chat chunks of a choice with tools: its text through the choice's `ToolCallParser`
        (content and tool-call deltas), then, at the end, a chunk with the finish reason."""
        assert self.tools is not None
        parser = self._tool_parsers.setdefault(index, self.tools.parser())
        deltas = parser.feed(text or "")
        if finish_reason:
            deltas += parser.finish()
        out = []
        for delta in deltas:
            body = self.chunk(index, None, None)
            body["choices"][0]["delta"] = delta
            out.append(body)
        if logprobs and out:
            out[0]["choices"][0]["logprobs"] = logprobs
        if finish_reason:
            out.append(self.chunk(index, None, tool_finish_reason(parser, finish_reason)))
        return out


async def stream_events(
    generation: Generation,
    deltas: AsyncIterator[tuple[int, RouterDelta]],
    first: tuple[int, RouterDelta],
    shape: ResponseShape,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body of a streaming response, starting from the already received `first`.

    Owns `deltas` (closing it cancels the Triton streams). An error after the first
    event becomes an `{"error": ...}` event (the status line is gone by then), followed
    by `[DONE]`, as vLLM does.
    """
    try:
        async with aclosing(deltas):
            index, delta = first
            while True:
                for event in _events_of(
                    generation, shape, index, delta, include_usage, continuous_usage
                ):
                    yield event
                try:
                    index, delta = await deltas.__anext__()
                except StopAsyncIteration:
                    break
        generation.finish()
        if include_usage:
            yield sse({**shape.usage_chunk(generation.usage()), "trident": generation.served_by()})
    except APIError as exc:
        logger.warning("stream %s failed after it started: %s", shape.id, exc.message)
        yield sse(exc.body())
    yield SSE_DONE


def _events_of(
    generation: Generation,
    shape: ResponseShape,
    index: int,
    delta: RouterDelta,
    include_usage: bool,
    continuous_usage: bool,
) -> list[str]:
    choice = generation.choices[index]
    events = []
    text = delta.text_output
    if not choice.started:
        choice.started = True
        if shape.echo is not None:
            text = shape.echo[choice.prompt_index] + text
        if shape.chat:
            events.append(
                sse(_with_usage(shape.chunk(index, None, None, role=True), None, include_usage))
            )
    logprobs, choice.new_logprobs = choice.new_logprobs, None
    if text or delta.finish_reason or logprobs:
        usage = generation.usage() if continuous_usage else None
        if shape.tools is not None and shape.tools.choice != "none":
            chunks = shape.tool_chunks(index, text, choice.finish_reason, logprobs)
        else:
            chunks = [shape.chunk(index, text, choice.finish_reason, logprobs=logprobs)]
        events.extend(sse(_with_usage(c, usage, include_usage)) for c in chunks)
    return events


def _with_usage(
    chunk: dict[str, Any], usage: dict[str, Any] | None, include_usage: bool
) -> dict[str, Any]:
    if include_usage:
        chunk["usage"] = usage
    return chunk
