"""Worker-side KV events: socket directory rules, config, and a real engine feeding a real router."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kv_manager.hashing import hash_blocks
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.triton.events import WorkerEvents, WorkerEventsConfig
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from tests.waiting import wait_until
from trident.core.endpoints import EVENTS_DIR_ENV, events_dir, events_endpoint, release_endpoint
from trident.core.errors import ConfigError
from trident.core.types import GenerateRequest, SamplingParams
from trident.serve_config import ServeConfig

BS = 4


def test_events_dir_from_env_is_created_private(tmp_path: Path) -> None:
    target = tmp_path / "kv"
    assert events_dir({}, {EVENTS_DIR_ENV: str(target)}) == target
    assert target.stat().st_mode & 0o777 == 0o700
    assert events_endpoint("decode_2", target) == f"ipc://{target}/decode_2.kv"
    # a model parameter works too; the environment wins over it
    other = tmp_path / "param"
    assert events_dir({"kv_events_dir": str(other)}, {}) == other
    assert events_dir({"kv_events_dir": str(other)}, {EVENTS_DIR_ENV: str(target)}) == target


def test_default_dir_is_per_user_and_per_server() -> None:
    path = events_dir({}, {})
    assert path.name == f"server-{os.getppid()}"
    assert path.parent.name == f"trident-kv-{os.getuid()}"
    assert path.stat().st_mode & 0o777 == 0o700
    release_endpoint(events_endpoint("decode", path))  # nothing bound there: it goes again
    assert not path.exists()


def test_last_worker_to_stop_removes_the_default_dir(tmp_path: Path) -> None:
    server = tmp_path / f"trident-kv-{os.getuid()}" / "server-4242"
    server.mkdir(parents=True)
    (server / "decode_1.kv").touch()  # another worker still publishes
    release_endpoint(events_endpoint("decode", server))
    assert server.is_dir()
    (server / "decode_1.kv").unlink()
    release_endpoint(events_endpoint("decode_1", server))
    assert not server.exists()
    configured = tmp_path / "kv"  # TRIDENT_KV_EVENTS_DIR: whoever set it owns it
    configured.mkdir()
    release_endpoint(events_endpoint("decode", configured))
    assert configured.is_dir()


def test_unsafe_or_unusable_dirs_are_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=EVENTS_DIR_ENV):
        events_dir({}, {EVENTS_DIR_ENV: str(shared)})
    with pytest.raises(ConfigError, match="too long"):
        events_endpoint("decode", tmp_path / ("x" * 120))
    with pytest.raises(ConfigError, match="worker"):
        events_endpoint("../decode", tmp_path)


def test_config_reads_params_then_env() -> None:
    assert WorkerEventsConfig.from_mapping({}, {}) == WorkerEventsConfig()
    cfg = WorkerEventsConfig.from_mapping({"kv_events": "false", "kv_load_report_ms": "250"}, {})
    assert cfg == WorkerEventsConfig(kv_events=False, kv_load_report_ms=250.0)
    assert WorkerEventsConfig.from_mapping({"kv_events": "false"}, {"TRIDENT_KV_EVENTS": "1"}).kv_events
    with pytest.raises(ConfigError, match="kv_events"):
        WorkerEventsConfig.from_mapping({"kv_events": "maybe"}, {})
    with pytest.raises(ConfigError, match="kv_events_poll_ms"):
        WorkerEventsConfig.from_mapping({}, {"TRIDENT_KV_EVENTS_POLL_MS": "0"})


def test_serve_router_policy_flag() -> None:
    config = ServeConfig.from_args(["--router-policy", "round_robin"], env={})
    assert config.engine_env()["TRIDENT_ROUTER_POLICY"] == "round_robin"
    assert "TRIDENT_ROUTER_POLICY" not in ServeConfig.from_args([], env={}).engine_env()
    assert ServeConfig.from_args([], env={"TRIDENT_ROUTER_POLICY": "random"}).router_policy == "random"
    with pytest.raises(ConfigError, match="router_policy"):
        ServeConfig.from_args(["--router-policy", "fastest"], env={})


def test_engine_events_reach_the_router(tiny_model_dir: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    engine = TorchEngine(
        TorchEngineConfig(model=tiny_model_dir, dtype="float32", block_size=BS, num_blocks=64, num_threads=1)
    )
    engine.start()
    router = KvRouter(RoutingConfig(block_size=BS, seed=0, worker_timeout_s=2.0))
    endpoint = events_endpoint("decode_1", tmp_path)
    events = WorkerEvents("decode_1", WorkerEventsConfig(kv_load_report_ms=100.0), endpoint=endpoint)
    try:
        with KvEventSubscriber(router) as sub:
            sub.add_worker(WorkerEndpoint("decode", events_endpoint("decode", tmp_path)))  # never starts
            sub.add_worker(WorkerEndpoint("decode_1", endpoint))
            events.start(engine)
            wait_until(lambda: router.workers() == ["decode_1"])  # announced / reported
            prompt = list(range(10, 10 + 6 * BS + 2))  # 6 full blocks
            sampling = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            chunks = list(engine.generate(GenerateRequest("r1", tuple(prompt), sampling), timeout=30))
            assert chunks[-1].finished
            wait_until(lambda: router.index.find_matches(hash_blocks(prompt, BS)) == {"decode_1": 6})
            decision = router.decide(prompt + [99] * BS, candidates=["decode", "decode_1"])
            assert decision.worker_id == "decode_1" and decision.cached_tokens == 6 * BS
            report = router.loads.report("decode_1")
            assert report is not None and report.total_blocks == 64 and report.block_size == BS
            events.close()  # "leave": the worker and its entries are gone at once
            wait_until(lambda: router.workers() == [])
            assert router.index.find_matches(decision.block_hashes) == {}
            assert router.removals("decode_1") == 1
            events.close()  # twice is harmless
    finally:
        events.close()
        engine.shutdown()
