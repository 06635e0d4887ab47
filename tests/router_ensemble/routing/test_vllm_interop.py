"""Interop: a separate process publishing in vLLM's wire format feeds our subscriber + index.

The publisher (`vllm_kv_publisher.py`) uses vLLM's own hashing-like scheme, several vLLM
payload layouts, and loses one batch on the live stream; our side must decode every layout,
recover the lost batch through vLLM's replay protocol, and map vLLM's hashes onto the
router's so that prompts are found by their tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from kv_manager.hashing import hash_blocks
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from tests.waiting import wait_until

SCRIPT = Path(__file__).with_name("vllm_kv_publisher.py")
BS = 16
PROMPT_A = list(range(1000, 1000 + 8 * BS))
PROMPT_B = PROMPT_A[: 2 * BS] + list(range(5000, 5000 + 4 * BS))


def test_vllm_publisher_process_feeds_the_index() -> None:
    threads_before = set(threading.enumerate())
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    router = KvRouter(RoutingConfig(block_size=BS, seed=0))
    router.add_worker("decode")  # a Trident worker with nothing cached
    sub = KvEventSubscriber(router).start()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        endpoints = json.loads(proc.stdout.readline())
        sub.add_worker(
            WorkerEndpoint(
                "vllm-0", endpoints["events"], endpoints["replay"], resync="replay", hashes="tokens"
            )
        )
        hashes_a, hashes_b = hash_blocks(PROMPT_A, BS), hash_blocks(PROMPT_B, BS)
        wait_until(lambda: router.index.find_matches(hashes_a) == {"vllm-0": 6})
        wait_until(lambda: router.index.num_blocks("vllm-0") == 11)  # 8 + 4 - 2 removed + 1
        assert router.index.find_matches(hashes_b) == {"vllm-0": 6}
        status = sub.status("vllm-0")
        assert status["gaps"] == 1 and status["resyncs"] == 1 and status["next_seq"] == 5

        decision = router.decide(PROMPT_A + [1, 2, 3])
        assert decision.worker_id == "vllm-0"
        assert decision.overlap_blocks == 6 and decision.cached_tokens == 6 * BS

        proc.stdin.write("clear\n")
        proc.stdin.flush()
        wait_until(lambda: router.index.num_blocks("vllm-0") == 0)
        assert router.index.find_matches(hashes_a) == {}
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        sub.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    time.sleep(0.05)
    assert [t for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []
