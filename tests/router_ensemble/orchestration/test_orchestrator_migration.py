"""Request migration in the orchestrator (`Orchestrator.run`, `orchestration.migration`): a
worker lost before answering (unloaded between selection and the call, e.g. by the planner)
or mid-stream is replaced, the new worker continuing from the tokens generated so far, at
most `migration_limit` times. The real tokenizer, selector and directory; fake worker
models behind the `WorkerClient` port, which continue the one fixed answer from where the
request says it stopped (as a greedy model would)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Sequence

import pytest

from router_ensemble.orchestration.migration import Migration, MigrationConfig
from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.orchestration.ports import Selection
from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from router_ensemble.text.tokenizer import Tokenizer, load_tokenizer
from trident.core.errors import EngineError, KvHandoffLost, WorkerUnavailable
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
    """Fake worker models (`WorkerClient`): each answers the rest of ANSWER from the request's
    `output_offset` on (checking that the prompt carries the tokens before it) in two chunks,
    unless told to fail. `how[worker]`: "vanish" (unloaded: raises `error` before any chunk),
    "vanish_silently" (unloaded: the stream ends without a chunk), "vanish_after_chunk"
    (one chunk, then unloaded), "abort_after_chunk" (one chunk, then a final "abort" of its
    own, as a worker shutting down sends), "fail" (raises `error` but stays loaded)."""

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
        done = request.output_offset
        assert request.input_ids == PROMPT + self.answer[:done]
        rest = self.answer[done : done + request.sampling.max_tokens]
        half = max(1, len(rest) // 2)
        n_in = len(request.input_ids)
        yield TokenChunk(request.request_id, rest[:half], num_input_tokens=n_in, cached_tokens=2)
        if how == "vanish_after_chunk":
            self.server.ready.discard(worker)
            raise self.error(f"worker {worker} is not ready")
        if how == "abort_after_chunk":
            yield TokenChunk(request.request_id, (), finished=True, finish_reason="abort", num_input_tokens=n_in)
            return
        yield TokenChunk(request.request_id, rest[half:], finished=True, finish_reason="length",
                         num_input_tokens=n_in, cached_tokens=2)

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


def setup(tokenizer: Tokenizer, *names: str, error: type[Exception] = WorkerUnavailable, **migration: int):
    server = Server(*names)
    # refresh_s so long that only is_gone re-scans: the directory still lists a worker that
    # was unloaded after the last scan, as in the race the retry is for
    directory = WorkerDirectory("decode", probe=server, refresh_s=1e9, max_gap=2, clock=lambda: 0.0)
    selector = CountingSelector(RoundRobinSelector(directory))
    workers = Workers(server, tokenizer.encode(ANSWER, add_special_tokens=False), error)
    orch = Orchestrator(tokenizer, selector, workers, migration=Migration(MigrationConfig(**migration)))
    return orch, selector, workers


def run(orch: Orchestrator, stream: bool = False, max_tokens: int = 8) -> list[RouterDelta]:
    out: list[RouterDelta] = []
    request = RouterRequest(SamplingParams(max_tokens=max_tokens, temperature=0.0), input_ids=PROMPT, stream=stream)
    orch.run(request, out.append)
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


def test_the_retry_is_the_same_request_under_a_new_id(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish"
    run(orch)
    (_, first), (_, second) = workers.calls
    assert second.request_id == first.request_id + ".1"  # a lease or abort never hits the lost run
    assert first.input_ids == second.input_ids == PROMPT and second.output_offset == 0
    assert second.sampling == first.sampling
    assert [r for r, _, _ in selector.selected] == [first.request_id, second.request_id]
    assert orch.migration.counts() == {"gone": 1}


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
    orch, selector, workers = setup(tokenizer, "decode", "decode_1", error=EngineError)
    workers.how["decode"] = "fail"
    with pytest.raises(EngineError, match="worker decode failed"):
        run(orch)
    assert workers.workers_called == ["decode"]
    assert selector.gone_checks == ["decode"]
    assert len(selector.selected) == 1
    selector.assert_one_release_per_select()
    assert selector.served == []
    assert orch.migration.counts() == {}


@pytest.mark.parametrize("how, cause", [("vanish_after_chunk", "gone"), ("abort_after_chunk", "aborted")])
@pytest.mark.parametrize("stream", [False, True])
def test_a_worker_lost_mid_stream_is_continued_elsewhere(tokenizer: Tokenizer, stream: bool, how: str, cause: str) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = how
    out = run(orch, stream=stream, max_tokens=len(workers.answer) + 3)
    assert workers.workers_called == ["decode", "decode_1"]
    (_, first), (_, second) = workers.calls
    half = max(1, len(workers.answer) // 2)
    # the replacement got the prompt plus what the lost worker had generated, and the rest of the budget
    assert second.input_ids == PROMPT + workers.answer[:half] and second.output_offset == half
    assert second.sampling.max_tokens == first.sampling.max_tokens - half
    # one unbroken answer: the same tokens and text as an undisturbed run
    assert "".join(d.text_output for d in out) == ANSWER
    assert sum((d.output_ids for d in out), ()) == workers.answer
    final = out[-1]
    assert final.final and final.finish_reason == "length" and not any(d.final for d in out[:-1])
    assert final.num_output_tokens == len(workers.answer) and final.num_input_tokens == len(PROMPT)
    assert final.worker == "decode_1"
    assert orch.migration.counts() == {cause: 1}
    selector.assert_one_release_per_select()


def test_min_tokens_and_the_seed_travel_with_the_request(tokenizer: Tokenizer) -> None:
    orch, _, workers = setup(tokenizer, "decode", "decode_1")
    workers.how["decode"] = "vanish_after_chunk"
    sampling = SamplingParams(max_tokens=20, min_tokens=6, temperature=0.7, seed=11)
    orch.run(RouterRequest(sampling, input_ids=PROMPT), lambda d: None)
    (_, first), (_, second) = workers.calls
    half = max(1, len(workers.answer) // 2)
    assert second.sampling.seed == 11 and second.sampling.temperature == 0.7
    assert second.sampling.min_tokens == max(0, 6 - half) and second.output_offset == half


def test_a_request_past_the_length_cap_is_not_migrated(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1", migration_max_tokens=len(PROMPT))
    workers.how["decode"] = "vanish_after_chunk"
    with pytest.raises(WorkerUnavailable, match=r"not migrated: its \d+ tokens exceed migration_max_tokens \(5\)"):
        run(orch)
    assert workers.workers_called == ["decode"]
    selector.assert_one_release_per_select()


def test_migration_off_ends_the_request_with_the_workers_error(tokenizer: Tokenizer) -> None:
    orch, _, workers = setup(tokenizer, "decode", "decode_1", migration_limit=0)
    workers.how["decode"] = "vanish"
    with pytest.raises(WorkerUnavailable, match=r"worker decode is not ready \(not migrated: migration is off\)"):
        run(orch)
    assert workers.workers_called == ["decode"]


def test_at_most_migration_limit_moves_then_the_error_propagates(tokenizer: Tokenizer) -> None:
    names = ("decode", "decode_1", "decode_2", "decode_3", "decode_4")
    orch, selector, workers = setup(tokenizer, *names)
    workers.how.update({name: "vanish" for name in names})
    limit = orch.migration.config.migration_limit
    assert limit == 3  # the default
    with pytest.raises(WorkerUnavailable, match=r"not migrated: migration_limit \(3\) reached"):
        run(orch)
    assert len(workers.workers_called) == 1 + limit
    assert len(set(workers.workers_called)) == len(workers.workers_called)  # never the same one twice
    assert workers.server.ready  # a healthy worker was left, but the budget was spent
    assert len(selector.selected) == 1 + limit
    selector.assert_one_release_per_select()
    assert orch.migration.counts() == {"gone": limit}


def test_a_failed_kv_handoff_is_recomputed_on_the_same_pool(tokenizer: Tokenizer) -> None:
    orch, selector, workers = setup(tokenizer, "decode", "decode_1", error=KvHandoffLost)
    workers.how["decode"] = "fail"  # still ready: it only failed to pull
    (final,) = run(orch)
    assert final.text_output == ANSWER
    assert orch.migration.counts() == {"kv_handoff": 1}
    # the decode worker is not excluded: only the handoff failed
    assert [ex for _, _, ex in selector.selected] == [(), ()]


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


class LogprobWorkers(Workers):
    """Workers whose chunks carry logprobs: output position p gets -p (and one alternative),
    the prompt's on the first chunk of a request that asks for them."""

    def _chunks(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        done = request.output_offset
        for chunk in super()._chunks(worker, request):
            n = len(chunk.output_ids)
            lps = tuple(-float(done + i) for i in range(n))
            extra = {}
            if request.sampling.prompt_logprobs is not None and done == 0 and n:
                extra = {"prompt_logprobs": (-0.5,) * (len(PROMPT) - 1),
                         "prompt_top_logprobs": (((7, -0.25),),) * (len(PROMPT) - 1)}
            yield TokenChunk(**{**{f: getattr(chunk, f) for f in chunk.__slots__}, "logprobs": lps,
                                "top_logprobs": tuple(((9, lp),) for lp in lps), **extra})
            done += n


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_survive_a_migration(tokenizer: Tokenizer, stream: bool) -> None:
    server = Server("decode", "decode_1")
    directory = WorkerDirectory("decode", probe=server, refresh_s=1e9, max_gap=2, clock=lambda: 0.0)
    workers = LogprobWorkers(server, tokenizer.encode(ANSWER, add_special_tokens=False))
    orch = Orchestrator(tokenizer, RoundRobinSelector(directory), workers)
    workers.how["decode"] = "vanish_after_chunk"
    out: list[RouterDelta] = []
    sampling = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=1)
    orch.run(RouterRequest(sampling, input_ids=PROMPT, stream=stream), out.append)
    n = len(workers.answer)
    assert [x for d in out for x in d.output_logprobs] == [-float(p) for p in range(n)]
    assert [t for d in out for t in d.top_logprob_ids] == [9] * n
    assert [t for d in out for t in d.output_tokens] == [tokenizer.decode([t], False) for t in workers.answer]
    assert [x for d in out for x in d.prompt_token_logprobs] == [-0.5] * (len(PROMPT) - 1)
    assert [tuple(d.prompt_ids) for d in out if d.prompt_ids] == [PROMPT]  # sent once
    (_, first), (_, moved) = workers.calls
    assert first.sampling.prompt_logprobs == 1 and moved.sampling.prompt_logprobs is None
