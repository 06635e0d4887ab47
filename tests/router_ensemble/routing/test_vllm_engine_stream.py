"""vLLM's own `ZmqEventPublisher` (the real one, from the installed vLLM) feeding the router.

A vLLM worker publishes its KV events on its own socket, hashed its own way (sha256 bytes);
the worker's Trident publisher sends only load reports and announces that name that socket
(`kv_manager.publisher.EngineEvents`). The subscriber must find the stream from the reports,
replay what it missed through vLLM's replay protocol (vLLM >= 0.32 puts the topic first),
recompute the router's hashes from the token ids, and start over when the worker restarts.
"""

from __future__ import annotations

import hashlib
import time

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import (  # noqa: E402
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from kv_manager.events import EngineEvents  # noqa: E402
from kv_manager.hashing import hash_blocks  # noqa: E402
from kv_manager.publisher import KVEventPublisher  # noqa: E402
from router_ensemble.routing.config import RoutingConfig  # noqa: E402
from router_ensemble.routing.router import KvRouter  # noqa: E402
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from trident.core.types import EngineStats  # noqa: E402

BS = 32
PROMPT_A = list(range(1000, 1000 + 4 * BS))
PROMPT_B = PROMPT_A[:BS] + list(range(7000, 7000 + 2 * BS))
IDLE = EngineStats(0, 0, 0, 100, 0, 0, 0, 0, 0, 0)


def _vllm_hashes(tokens: list[int], parent: bytes | None) -> list[bytes]:
    out = []
    for i in range(0, len(tokens), BS):
        parent = hashlib.sha256((parent or b"") + str(tokens[i:i + BS]).encode()).digest()
        out.append(parent)
    return out


def _stored(tokens: list[int], parent: bytes | None = None) -> BlockStored:
    return BlockStored(block_hashes=_vllm_hashes(tokens, parent), parent_block_hash=parent,
                       token_ids=tokens, block_size=BS, lora_id=None, medium="GPU", lora_name=None)


def _publish(pub: ZmqEventPublisher, *events) -> None:
    pub.publish(KVEventBatch(ts=time.time(), events=list(events), data_parallel_rank=0))


def test_router_follows_a_vllm_workers_own_event_stream(tmp_path) -> None:
    events_ep = f"ipc://{tmp_path}/w.kv-engine"
    replay_ep = events_ep + "-replay"
    router = KvRouter(RoutingConfig(block_size=BS, seed=0))
    sub = KvEventSubscriber(router).start()
    vllm_pub = ZmqEventPublisher(0, events_ep, replay_ep, topic="kv-events")
    load = KVEventPublisher("w", f"ipc://{tmp_path}/w.kv", block_size=BS,
                            engine_events=EngineEvents(events_ep, replay_ep, "tokens"))
    try:
        # published before the router listens: only the replay buffer has it
        _publish(vllm_pub, _stored(PROMPT_A))
        time.sleep(0.3)
        sub.add_worker(WorkerEndpoint("w", load.endpoint, reports_load=True))
        hashes_a = hash_blocks(PROMPT_A, BS)

        def heard() -> bool:
            load.report_load(IDLE)
            return router.index.find_matches(hashes_a) == {"w": 4}

        wait_until(heard)
        assert sub.status("w")["resyncs"] == 1 and sub.status("w")["next_seq"] == 1

        # live: a second prompt sharing the first block, then vLLM evicts A's last block
        b_parent = _vllm_hashes(PROMPT_A, None)[0]
        _publish(vllm_pub, _stored(PROMPT_B[BS:], parent=b_parent))
        _publish(vllm_pub, BlockRemoved(block_hashes=[_vllm_hashes(PROMPT_A, None)[-1]], medium="GPU"))
        wait_until(lambda: router.index.find_matches(hash_blocks(PROMPT_B, BS)) == {"w": 3})
        wait_until(lambda: router.index.find_matches(hashes_a) == {"w": 3})
        decision = router.decide(PROMPT_B + [5, 6])
        assert decision.worker_id == "w" and decision.cached_tokens == 3 * BS

        # the worker restarts: a new load publisher instance and a vLLM stream from seq 0
        load.close()
        vllm_pub.shutdown()
        vllm_pub = ZmqEventPublisher(0, events_ep, replay_ep, topic="kv-events")
        load = KVEventPublisher("w", f"ipc://{tmp_path}/w.kv", block_size=BS,
                                engine_events=EngineEvents(events_ep, replay_ep, "tokens"))
        _publish(vllm_pub, _stored(PROMPT_B))

        def rebuilt() -> bool:
            load.report_load(IDLE)
            return (router.index.find_matches(hash_blocks(PROMPT_B, BS)) == {"w": 3}
                    and router.index.find_matches(hashes_a) == {"w": 1})

        wait_until(rebuilt)
        assert sub.status("w")["live"]
    finally:
        sub.close()
        load.close()
        vllm_pub.shutdown()
