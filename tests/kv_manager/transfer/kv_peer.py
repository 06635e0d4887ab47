"""Processes for the KV transfer tests: a real prefill side and a real decode side.

Started with the `spawn` start method (what CUDA needs, and what keeps the child free of the
parent's state); they talk to the test over a `multiprocessing` pipe.
"""

from __future__ import annotations

import os
import time

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.nixl import NixlPool

LAYOUT_ARGS = (2, 2, 8, 4, "bfloat16", "tiny-test-model")
SHORT_TTL_S = 0.4
SHORT_GRACE_S = 0.1


def block_bytes(tensor: torch.Tensor, ids: list[int]) -> bytes:
    return tensor[ids].cpu().contiguous().view(torch.uint8).numpy().tobytes()


def prefill_main(
    conn, layout_args, num_blocks: int, device: str, seed: int, nixl_secret: bytes | None = None
) -> None:
    """Own a shareable pool filled with seeded noise and two exporters over it (with
    `nixl_secret`: a plain pool that peers reach through NIXL, as on another node).

    "long" leases last 60 s; "short" ones SHORT_TTL_S (+ SHORT_GRACE_S before freeing).
    Commands: ("export", which, block_ids, num_tokens, hashes) -> descriptor bytes;
    ("poll", which) -> released lists; ("held", which) -> int; ("blocks", ids) -> bytes;
    ("close",) -> closes everything; ("exit",) -> returns without closing anything.
    """
    torch.set_num_threads(1)
    layout = KVLayout(*layout_args)
    pool = allocate_pool(layout, num_blocks, device, shareable=nixl_secret is None)
    if nixl_secret is not None:
        pool = NixlPool(pool, "prefill", nixl_secret)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(pool.tensor.shape, generator=gen).to(pool.tensor.dtype)
    pool.tensor.copy_(noise)
    exporters = {
        "long": KVExporterImpl(pool, layout, "prefill-long", 60.0),
        "short": KVExporterImpl(
            pool, layout, "prefill-short", SHORT_TTL_S, expiry_grace_s=SHORT_GRACE_S
        ),
    }
    conn.send(("ready", os.getpid(), getattr(pool, "name", "")))
    while True:
        cmd, *args = conn.recv()
        if cmd == "export":
            which, ids, num_tokens, hashes = args
            conn.send(
                exporters[which].export(f"req-{time.monotonic_ns()}", ids, num_tokens, hashes)
            )
        elif cmd == "poll":
            conn.send(exporters[args[0]].poll_released())
        elif cmd == "held":
            conn.send(exporters[args[0]].held_blocks())
        elif cmd == "blocks":
            conn.send(block_bytes(pool.tensor, args[0]))
        elif cmd == "close":
            for exporter in exporters.values():
                exporter.close()
            pool.close()
            if isinstance(pool, NixlPool):
                pool.memory.close()
            conn.send("closed")
            return
        elif cmd == "exit":
            conn.send("exiting")
            return


def decode_open_then_hang(conn, layout_args, device: str) -> None:
    """Receive a descriptor, open and pull it, then wait to be killed without releasing it."""
    torch.set_num_threads(1)
    layout = KVLayout(*layout_args)
    importer = KVImporterImpl(layout)
    conn.send("started")
    descriptor = conn.recv()
    desc = importer.open(descriptor)
    dst = torch.zeros(layout.pool_shape(len(desc.block_ids)), dtype=torch.bfloat16, device=device)
    importer.pull(desc, dst, list(range(len(desc.block_ids))))
    conn.send("opened")
    time.sleep(600)
