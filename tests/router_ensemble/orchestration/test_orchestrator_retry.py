"""The orchestrator's retry on another decode worker (`Orchestrator.run`, `_may_retry`): a
worker that went away before answering (unloaded between selection and the call, e.g. by
the planner) is replaced while the client has seen nothing, at most `MAX_WORKER_RETRIES`
times. The real tokenizer, selector and directory; fake worker models behind the
`WorkerClient` port."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Sequence

import pytest

from router_ensemble.orchestration.orchestrator import MAX_WORKER_RETRIES, Orchestrator
from router_ensemble.orchestration.ports import Selection
from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from router_ensemble.text.tokenizer import Tokenizer, load_tokenizer
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.router_io import RouterDelta, RouterRequest
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk

ANSWER = "Hello there, world"
PROMPT = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("")


class Server:
    """The worker models loaded on the server: the directory's readiness probe."""

    def __init__(self, *ready: str) -> None:
        self.ready = set(ready)

    def __call__(self, name: str) -> bool:
        return name in self.ready


class Workers:
    """Fake worker models (`WorkerClient`): each answers ANSWER in two chunks, unless told
    to fail. `how[worker]`: "vanish" (unloaded: raises `error` before any chunk),
    "vanish_silently" (unloaded: the stream ends without a chunk), "vanish_after_chunk"
    (one chunk, then unloaded), "fail" (raises `error` but stays loaded)."""

    def __init__(self, server: Server, answer: Sequence[int], error: type[Exception] = WorkerUnavailable) -> None:
        self.server = server
        self.answer = tuple(answer)
        self.error = error
        self.how: dict[str, str] = {}
        self.calls: list[tuple[str, GenerateRequest]] = []

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        self.calls.append((worker, request))
        return self._chunks(worker, request)

    def _chunks(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        how = self.how.get(worker, "")
        if how in ("vanish", "vanish_silently"):
            self.server.ready.discard(worker)
            if how == "vanish_silently":
                return
            raise self.error(f"worker {worker} is not ready")
        if how == "fail":
            raise self.error(f"worker {worker} failed")
        half = len(self.answer) // 2
        yield TokenChunk(request.request_id, self.answer[:half], num_input_tokens=len(request.input_ids), cached_tokens=2)
        if how == "vanish_after_chunk":
            self.server.ready.discard(worker)
            raise self.error(f"worker {worker} is not ready")
        yield TokenChunk(request.request_id, self.answer[half:], finished=True, finish_reason="length",
                         num_input_tokens=len(request.input_ids), cached_tokens=2)

    def abort(self, worker: str, request_id: str) -> None:
        return None

    @property
    def workers_called(self) -> list[str]:
        return [w for w, _ in self.calls]


class CountingSelector:
    """The real round-robin selector, noting each call."""

    def __init__(self, inner: RoundRobinSelector) -> None:
        self.inner = inner
        self.selected: list[tuple[str, str, tuple[str, ...]]] = []  # (request_id, worker, exclude)
        self.released: list[str] = []
        self.gone_checks: list[str] = []
        self.served: list[tuple[str, int, int]] = []

    def select(self, request_id: str, token_ids: Sequence[int], exclude: Collection[str] = ()) -> Selection:
        selection = self.inner.select(request_id, token_ids, exclude)
        self.selected.append((request_id, selection.worker, tuple(exclude)))
        return selection

    def release(self, request_id: str) -> None:
        self.released.append(request_id)
        self.inner.release(request_id)

    def record_served(self, worker: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.served.append((worker, prompt_tokens, cached_tokens))

    def is_gone(self, worker: str) -> bool:
        self.gone_checks.append(worker)
        return self.inner.is_gone(worker)

    def assert_one_release_per_select(self) -> None:
        assert Counter(self.released) == Counter(r for r, _, _ in self.selected)


def setup(tokenizer: Tokenizer, *names: str, error: type[Exception] = WorkerUnavailable):
    server = Server(*names)
    # refresh_s so long that only is_gone re-scans: the directory still lists a worker that
    # was unloaded after the last scan, as in the race the retry is for
    directory = WorkerDirectory("decode", probe=server, refresh_s=1e9, max_gap=2, clock=lambda: 0.0)
    selector = CountingSelector(RoundRobinSelector(directory))
    workers = Workers(server, tokenizer.encode(ANSWER, add_special_tokens=False), error)
    return Orchestrator(tokenizer, selector, workers), selector, workers


def run(orch: Orchestrator, stream: bool = False) -> list[RouterDelta]:
    out: list[RouterDelta] = []
    orch.run(RouterRequest(SamplingParams(max_tokens=8, temperature=0.0), input_ids=PROMPT, stream=stream), out.append)
    return out


@pytest.mark.parametrize("error", [WorkerUnavailable, EngineError])
def test_a_worker_gone_before_answering_is_replaced(tokenizer: Tokenizer, error: type[Exception]) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1", error=error)
    workers.how["decode"] = "vanish"
    (final,) = run(orch)
    assert workers.workers_called == ["decode", "decode_1"]
    assert final.worker == "decode_1" and final.text_output == ANSWER and final.finish_reason == "length"
    assert final.num_output_tokens == len(workers.answer) and final.num_input_tokens == len(PROMPT)
    assert selector.gone_checks == ["decode"]
    assert [(w, ex) for _, w, ex in selector.selected] == [("decode", ()), ("decode_1", ("decode",))]
    selector.assert_one_release_per_select()
    assert selector.served == [("decode_1", len(PROMPT), 2)]


def test_the_retry_is_the_same_request(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish"
    run(orch)
    (first_id, first), (second_id, second) = [(r.request_id, r) for _, r in workers.calls]
    assert first_id == second_id and first.input_ids == second.input_ids == PROMPT
    assert len({r for r, _, _ in selector.selected}) == 1


def test_a_streamed_request_shows_only_the_replacements_output(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish"
    deltas = run(orch, stream=True)
    assert "".join(d.text_output for d in deltas) == ANSWER
    assert {d.worker for d in deltas} == {"decode_1"}
    assert deltas[-1].final and not any(d.final for d in deltas[:-1])
    selector.assert_one_release_per_select()


def test_a_worker_gone_that_ended_its_stream_silently_is_replaced(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish_silently"
    (final,) = run(orch)
    assert final.worker == "decode_1" and final.text_output == ANSWER
    selector.assert_one_release_per_select()


def test_a_failure_of_a_worker_still_ready_propagates(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "fail"
    with pytest.raises(WorkerUnavailable, match="worker decode failed"):
        run(orch)
    assert workers.workers_called == ["decode"]
    assert selector.gone_checks == ["decode"]
    assert len(selector.selected) == 1
    selector.assert_one_release_per_select()
    assert selector.served == []


@pytest.mark.parametrize("stream", [False, True])
def test_no_retry_once_a_chunk_came(tokenizer: Tokenizer, stream: bool) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish_after_chunk"
    out: list[RouterDelta] = []
    request = RouterRequest(SamplingParams(max_tokens=8, temperature=0.0), input_ids=PROMPT, stream=stream)
    with pytest.raises(WorkerUnavailable, match="worker decode is not ready"):
        orch.run(request, out.append)
    assert workers.workers_called == ["decode"]
    assert selector.gone_checks == []  # the client may have seen tokens: not even asked
    if stream:
        assert out and {d.worker for d in out} == {"decode"} and not any(d.final for d in out)
    else:
        assert out == []
    selector.assert_one_release_per_select()


def test_at_most_max_worker_retries_then_the_error_propagates(tokenizer: Tokenizer) -> None:
    names = ("decode", "decode_1", "decode_2", "decode_3")
    orch, selector, workers = setup(tokenizer, *names)
    workers.how.update({name: "vanish" for name in names})
    with pytest.raises(WorkerUnavailable, match="is not ready"):
        run(orch)
    assert MAX_WORKER_RETRIES >= 1
    assert len(workers.workers_called) == 1 + MAX_WORKER_RETRIES
    assert len(set(workers.workers_called)) == len(workers.workers_called)  # never the same one twice
    assert "decode_3" in workers.server.ready  # a healthy worker was left, but the budget was spent
    assert len(selector.selected) == 1 + MAX_WORKER_RETRIES
    selector.assert_one_release_per_select()


def test_when_every_worker_is_gone_the_selection_fails(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how.update({"decode": "vanish", "decode_1": "vanish"})
    with pytest.raises(WorkerUnavailable, match="no decode worker is ready"):
        run(orch)
    assert workers.workers_called == ["decode", "decode_1"]
    assert len(selector.selected) == 2
    selector.assert_one_release_per_select()


def test_a_healthy_request_selects_and_releases_once(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    (final,) = run(orch)
    assert final.worker == "decode" and final.text_output == ANSWER
    assert workers.workers_called == ["decode"] and selector.gone_checks == []
    assert len(selector.selected) == 1
    selector.assert_one_release_per_select()
