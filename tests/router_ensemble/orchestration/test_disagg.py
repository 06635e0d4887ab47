"""Conditional disaggregation in the orchestrator, in-process: real engines (a prefill engine on a
shareable pool, a decode engine), the real tokenizer, no Triton."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from router_ensemble.orchestration.disagg import DisaggConfig, Disaggregator
from router_ensemble.orchestration.local_client import EngineWorkerClient
from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from router_ensemble.routing.router import KvRouter, KvSelector
from router_ensemble.text.tokenizer import load_tokenizer
from tests.waiting import wait_until
from trident.core.errors import ConfigError, EngineError, TridentError
from trident.core.router_io import RouterDelta, RouterRequest
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk

BLOCK = 4
THRESHOLD = 24
PROMPTS = [tuple(range(3, 40)), tuple(range(40, 101)), (9,) * 33, tuple(range(3, 40)) + tuple(range(60, 80))]


def _engine(model_dir: str, name: str, **kw) -> TorchEngine:
    settings = {"block_size": BLOCK, **kw}
    cfg = TorchEngineConfig(model=model_dir, dtype="float32", num_blocks=160, num_threads=1, worker_id=name, **settings)
    eng = TorchEngine(cfg)
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engines(tiny_model_dir: str) -> Iterator[dict[str, TorchEngine]]:
    torch.set_num_threads(1)
    made = {
        "decode": _engine(tiny_model_dir, "decode"),
        "prefill": _engine(tiny_model_dir, "prefill", shareable_kv=True, lease_ttl_s=0.5),
        "reference": _engine(tiny_model_dir, "reference"),  # aggregated runs, its own cache
    }
    yield made
    for eng in made.values():
        eng.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


class RecordingClient(EngineWorkerClient):
    """The in-process client, noting when each worker is called (to check the ordering)."""

    def __init__(self, engines, log: list) -> None:
        super().__init__(engines)
        self.log = log

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        self.log.append(("call", worker, request.hold_kv, request.kv_descriptor is not None))
        return super().generate(worker, request)


def _orchestrator(tokenizer, engines, decode: str = "decode", prefill: tuple[str, ...] = ("prefill",),
                  threshold: int = THRESHOLD, log: list | None = None, selector=None, **kw) -> Orchestrator:
    client = RecordingClient(engines, log if log is not None else [])
    selector = selector or RoundRobinSelector(WorkerDirectory("decode", fixed=(decode,)))
    directory = WorkerDirectory("prefill", fixed=prefill) if prefill else WorkerDirectory("prefill", probe=lambda n: False)
    disagg = Disaggregator(DisaggConfig(disagg_threshold=threshold, **kw), RoundRobinSelector(directory))
    return Orchestrator(tokenizer, selector, client, disagg=disagg)


def _run(orch: Orchestrator, ids: tuple[int, ...], n: int = 8, stream: bool = False, log: list | None = None,
         **sp) -> list[RouterDelta]:
    out: list[RouterDelta] = []

    def emit(delta: RouterDelta) -> None:
        if log is not None:
            log.append(("emit", delta.output_ids))
        out.append(delta)

    orch.run(RouterRequest(SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **sp), input_ids=ids,
                           stream=stream), emit)
    return out


def _ids(deltas: list[RouterDelta]) -> list[int]:
    return [t for d in deltas for t in d.output_ids]


def _wait_unheld(engine: TorchEngine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.held_blocks == 0 and stats.active_blocks == 0:
            return True
        time.sleep(0.05)
    return False


def test_disaggregated_greedy_equals_aggregated(tokenizer, engines) -> None:
    aggregated = Orchestrator(tokenizer, RoundRobinSelector(WorkerDirectory("decode", fixed=("reference",))),
                              EngineWorkerClient(engines))
    disagg = _orchestrator(tokenizer, engines)
    for ids in PROMPTS:  # the last one reuses the first one's blocks on the prefill worker
        expected = _run(aggregated, ids, 12)
        got = _run(disagg, ids, 12)
        assert _ids(got) == _ids(expected), ids
        assert got[-1].worker == "prefill>decode" and expected[-1].worker == "reference"
        assert got[-1].finish_reason == "length" and got[-1].num_output_tokens == 12
    assert got[-1].cached_tokens == 36  # the prefill worker's prefix-cache hit (9 blocks of 4)
    assert _wait_unheld(engines["prefill"]), "decode released every lease"


def test_first_token_reaches_the_client_before_decode_starts(tokenizer, engines) -> None:
    log: list = []
    out = _run(_orchestrator(tokenizer, engines, log=log), PROMPTS[1], 6, stream=True, log=log)
    calls = [entry for entry in log if entry[0] == "call"]
    assert calls == [("call", "prefill", True, False), ("call", "decode", False, True)]
    first_emit = next(i for i, e in enumerate(log) if e[0] == "emit")
    decode_call = log.index(("call", "decode", False, True))
    assert first_emit < decode_call and len(log[first_emit][1]) == 1
    assert len(_ids(out)) == 6 and all(d.worker == "prefill>decode" for d in out)


def test_short_prompts_and_disabled_threshold_stay_local(tokenizer, engines) -> None:
    log: list = []
    assert _run(_orchestrator(tokenizer, engines, log=log), tuple(range(3, 3 + THRESHOLD - 1)), 4)[-1].worker == "decode"
    assert _run(_orchestrator(tokenizer, engines, threshold=0, log=log), PROMPTS[1], 4)[-1].worker == "decode"
    assert [e[1] for e in log] == ["decode", "decode"]


def test_kv_router_overlap_counts_as_cached(tokenizer, engines) -> None:
    router = KvRouter(RoutingConfig(block_size=BLOCK, kv_events=False))  # approximate: assume cached
    router.add_worker("decode")
    selector = KvSelector(router, WorkerDirectory("decode", fixed=("decode",)))
    first = selector.select("r0", PROMPTS[1])
    assert (first.worker, first.cached_tokens) == ("decode", 0)
    orch = _orchestrator(tokenizer, engines, selector=selector)
    # The router now assumes decode holds PROMPTS[1]'s 15 full blocks: 1 uncached token, local.
    assert _run(orch, PROMPTS[1], 3)[-1].worker == "decode"
    assert _run(orch, PROMPTS[2], 3)[-1].worker == "prefill>decode"


def test_max_tokens_one_is_served_by_prefill_alone(tokenizer, engines) -> None:
    out = _run(_orchestrator(tokenizer, engines), PROMPTS[2], 1)
    assert out[-1].worker == "prefill" and len(_ids(out)) == 1 and out[-1].finish_reason == "length"
    assert engines["prefill"].stats().held_blocks == 0  # no lease was taken


def test_gone_prefill_worker_falls_back_to_local_prefill(tokenizer, engines) -> None:
    reference = _run(_orchestrator(tokenizer, engines, threshold=0), PROMPTS[0], 6)
    orch = _orchestrator(tokenizer, engines, prefill=("prefill_9",))  # listed, but no such worker
    out = _run(orch, PROMPTS[0], 6)
    assert out[-1].worker == "decode" and _ids(out) == _ids(reference)
    assert orch.disagg is not None and orch.disagg.inflight() == {}
    none_ready = _orchestrator(tokenizer, engines, prefill=())
    assert _run(none_ready, PROMPTS[0], 2)[-1].worker == "decode"


class HungClient:
    """A worker that accepted the call and never answers (Triton, for a model unloading under it)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        self.release.wait(30)
        raise TridentError("released")
        yield  # a generator, like every client


def test_a_prefill_worker_that_hangs_and_goes_away_is_bypassed(tokenizer, engines) -> None:
    from router_ensemble.triton.watched_client import WatchedWorkerClient

    ready = {"prefill": True}
    directory = WorkerDirectory("prefill", probe=lambda name: ready.get(name, False), refresh_s=60)
    hung = HungClient()
    removed = lambda worker: 0 if ready.get(worker) else 1  # noqa: E731  (the pool's removal count)
    watched = WatchedWorkerClient(hung, removed, poll_s=0.05, stall_s=0.2)
    disagg = Disaggregator(DisaggConfig(disagg_threshold=THRESHOLD), RoundRobinSelector(directory), watched)
    orch = Orchestrator(tokenizer, RoundRobinSelector(WorkerDirectory("decode", fixed=("decode",))),
                        EngineWorkerClient(engines), disagg=disagg)
    threading.Timer(0.5, lambda: ready.update(prefill=False)).start()  # unloaded while the call hangs
    try:
        start = time.monotonic()
        out = _run(orch, PROMPTS[1], 4)
        assert out[-1].worker == "decode" and len(_ids(out)) == 4
        assert 0.5 < time.monotonic() - start < 10
        assert disagg.inflight() == {} and directory.workers() == ()
    finally:
        hung.release.set()


def test_prefill_failures_are_clear_errors(tokenizer, engines) -> None:
    # A worker without a shareable pool cannot hand its KV over.
    orch = _orchestrator(tokenizer, engines, prefill=("reference",))
    with pytest.raises(EngineError, match="prefill worker reference returned no KV descriptor.*shareable_kv"):
        _run(orch, PROMPTS[1], 4)
    # The prefill worker's own validation error reaches the client naming the field.
    with pytest.raises(TridentError, match="prefill worker prefill failed: .*prompt"):
        _run(_orchestrator(tokenizer, engines), tuple(range(3, 120)) * 3, 4)
    assert orch.disagg is not None and orch.disagg.inflight() == {}


def test_decode_refusing_the_layout_recomputes_the_prompt_and_revokes_the_lease(tokenizer, engines, tiny_model_dir) -> None:
    other = _engine(tiny_model_dir, "decode_8", block_size=8)  # another layout: the fingerprint differs
    try:
        log: list = []
        orch = _orchestrator(tokenizer, {**engines, "decode_8": other}, decode="decode_8", log=log)
        out = _run(orch, PROMPTS[1], 4)
        # the decode worker refused the handoff before its first token: it recomputed the
        # prompt (with the first token) itself, and the answer is the aggregated one
        assert _ids(out) == _ids(_run(_orchestrator(tokenizer, engines, decode="reference", prefill=()), PROMPTS[1], 4))
        assert orch.migration.counts() == {"kv_handoff": 1}
        assert [w for kind, w, *_ in log if kind == "call"] == ["prefill", "decode_8", "decode_8"]
        # nobody pulled: the router revoked the lease instead of leaving it to expire (2.5 s)
        started = time.monotonic()
        assert _wait_unheld(engines["prefill"])
        assert time.monotonic() - started < 1.0
        assert other.stats().active_blocks == 0
    finally:
        other.shutdown()


def test_a_cancel_at_the_first_token_revokes_the_lease_at_once(tokenizer, engines) -> None:
    orch = _orchestrator(tokenizer, engines)
    out: list[RouterDelta] = []
    request = RouterRequest(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), input_ids=PROMPTS[1],
                            stream=True)
    orch.cancel_poll_s = 0.0
    final = orch.run(request, out.append, is_cancelled=lambda: bool(out))  # cancelled once the first token is out
    assert final.finish_reason == "abort" and len(_ids(out)) == 1
    # the prefill worker frees the blocks now, not after lease_ttl_s + the expiry grace (2.5 s)
    started = time.monotonic()
    wait_until(lambda: engines["prefill"].stats().leases == 0 and engines["prefill"].stats().held_blocks == 0,
               timeout=5)
    assert time.monotonic() - started < 1.0


def test_saturated_prefill_pool_prefills_locally() -> None:
    disagg = Disaggregator(DisaggConfig(disagg_threshold=10, prefill_max_inflight=2),
                           RoundRobinSelector(WorkerDirectory("prefill", fixed=("prefill", "prefill_1"))))
    sp = SamplingParams(max_tokens=4)
    prompt = tuple(range(50))
    routes = [disagg.route(f"r{i}", "decode", prompt, 0, sp) for i in range(5)]
    assert [r.label for r in routes] == ["prefill>decode", "prefill_1>decode", "prefill>decode",
                                         "prefill_1>decode", "decode"]
    assert disagg.route("c", "decode", prompt, 45, sp).label == "decode"  # 5 uncached tokens
    routes[0].close()
    routes[0].close()  # idempotent
    assert disagg.inflight() == {"prefill": 1, "prefill_1": 2}
    assert disagg.route("r5", "decode", prompt, 0, sp).label == "prefill>decode"


def test_concurrent_requests_share_the_pool(tokenizer, engines) -> None:
    orch = _orchestrator(tokenizer, engines, prefill_max_inflight=1)
    results: dict[int, list[RouterDelta]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _run(orch, PROMPTS[i % 3], 5)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(len(_ids(r)) == 5 for r in results.values())
    assert {r[-1].worker for r in results.values()} <= {"prefill>decode", "decode"}
    assert orch.disagg is not None and orch.disagg.inflight() == {}
    assert _wait_unheld(engines["prefill"])


def test_config_reads_parameters_and_environment() -> None:
    config = DisaggConfig.from_mapping({"disagg_threshold": "64", "prefill_models": "p, p_1"},
                                       env={"TRIDENT_ROUTER_PREFILL_MAX_INFLIGHT": "7", "TRIDENT_ROUTER_DISAGG_THRESHOLD": ""})
    assert (config.disagg_threshold, config.prefill_max_inflight, config.fixed_models) == (64, 7, ("p", "p_1"))
    assert DisaggConfig.from_mapping({"disagg_threshold": "${X}"}, env={}).disagg_threshold == 256
    with pytest.raises(ConfigError, match="disagg_threshold"):
        DisaggConfig.from_mapping({}, env={"TRIDENT_ROUTER_DISAGG_THRESHOLD": "-3"})
    with pytest.raises(ConfigError, match="prefill_max_inflight"):
        DisaggConfig.from_mapping({"prefill_max_inflight": "lots"}, env={})
    pool = RoundRobinSelector(WorkerDirectory("prefill", fixed=("prefill_2",)))
    route = Disaggregator(DisaggConfig(disagg_threshold=1), pool).route("x", "decode_1", (1, 2), 0, SamplingParams())
    assert route.label == "prefill_2>decode_1"


def test_the_inflight_limit_holds_under_concurrent_routing() -> None:
    """Threads routing at once never put more than `prefill_max_inflight` on one worker, even
    when the selector takes its time (as the KV selector's decision does)."""

    class SlowSelector(RoundRobinSelector):
        def select(self, request_id, token_ids, exclude=()):  # type: ignore[no-untyped-def]
            time.sleep(0.02)
            return super().select(request_id, token_ids, exclude)

    disagg = Disaggregator(DisaggConfig(disagg_threshold=10, prefill_max_inflight=2),
                           SlowSelector(WorkerDirectory("prefill", fixed=("prefill", "prefill_1"))))
    prompt, sp = tuple(range(50)), SamplingParams(max_tokens=4)
    barrier = threading.Barrier(8)
    routes = []

    def route(i: int) -> None:
        barrier.wait()
        routes.append(disagg.route(f"r{i}", "decode", prompt, 0, sp))

    threads = [threading.Thread(target=route, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(n <= 2 for n in disagg.inflight().values()), disagg.inflight()
    assert sorted(r.label for r in routes).count("decode") == 4
    for r in routes:
        r.close()
    assert disagg.inflight() == {}
