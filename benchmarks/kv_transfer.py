"""KV transfer throughput: pulling scattered blocks from a peer process vs a plain memcpy.

A spawned prefill-side process owns a shareable KV pool with SmolLM2-135M's layout (30
layers, 3 KV heads, head dim 64, blocks of 16 tokens, bf16: 360 KiB per block) and exports
leases. This process opens each descriptor with `KVImporterImpl`, then pulls 1, 2, 4, ... 256
blocks at random (scattered) source ids into random ids of its own pool, and in the same run
times `copy_` of one contiguous tensor of the same number of bytes from the same mapped pool
into its own pool: the memcpy the transfer layer is measured against. Pull and memcpy
repetitions alternate, and the median of each is reported.

    python -m benchmarks.kv_transfer [--device cpu|cuda] [--transport local|nixl] [--json PATH]

The last line is `kv transfer: X GB/s = P% of memcpy` for the largest block count.
`--transport nixl` measures the cross-node path instead (`benchmarks.kv_transfer_nixl`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.common import alternate_medians, spawn_peer
from benchmarks.plots import add_plot_flag, write_plots
from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool

LAYOUT = KVLayout(30, 3, 64, 16, "bfloat16", "SmolLM2-135M-Instruct")
SIZES = [1 << i for i in range(9)]  # 1 .. 256 blocks


@dataclass(frozen=True, slots=True)
class Row:
    blocks: int
    bytes: int
    pull_gbps: float
    memcpy_gbps: float
    pct_of_memcpy: float
    open_us: float


def prefill_side(conn, num_blocks: int, device: str) -> None:
    """The peer: a shareable pool of random bytes and an exporter; answers export requests."""
    pool = allocate_pool(LAYOUT, num_blocks, device, shareable=True)
    flat = pool.tensor.view(-1).view(torch.int16)
    flat.copy_(torch.randint(-(2**15), 2**15, flat.shape, dtype=torch.int16))
    exporter = KVExporterImpl(pool, LAYOUT, "bench-prefill", lease_ttl_s=3600.0)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        conn.send(exporter.export("bench", msg, len(msg) * LAYOUT.block_size, []))
        exporter.poll_released()
    exporter.close()
    pool.close()


def run(device: str, pool_blocks: int, budget_s: float, seed: int) -> list[Row]:
    proc, conn, _ = spawn_peer(prefill_side, pool_blocks, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    importer = KVImporterImpl(LAYOUT)
    dst = allocate_pool(LAYOUT, pool_blocks, device, shareable=False)
    rng = random.Random(seed)
    rows = []
    try:
        for n in SIZES:
            src_ids, dst_ids = rng.sample(range(pool_blocks), n), rng.sample(range(pool_blocks), n)
            conn.send(src_ids)
            raw = conn.recv()
            t0 = time.perf_counter()
            desc = importer.open(raw)
            open_s = time.perf_counter() - t0
            src = importer.peer_pool(desc)

            def pull(desc=desc, dst_ids=dst_ids) -> None:
                importer.pull(desc, dst.tensor, dst_ids)

            def memcpy(n=n, src=src) -> None:
                dst.tensor[:n].copy_(src[:n])

            pulls, copies = alternate_medians(pull, memcpy, budget_s, sync)
            pull()  # the memcpy wrote over some destination blocks; check a fresh pull
            got, want = dst.tensor[dst_ids].view(torch.int16), src[src_ids].view(torch.int16)
            if not torch.equal(got, want):  # compare bits: random bf16 bits include NaNs
                raise RuntimeError(f"pulled blocks differ from the source at {n} blocks")
            importer.release(desc)
            nbytes = n * LAYOUT.block_nbytes
            p, m = nbytes / pulls / 1e9, nbytes / copies / 1e9
            rows.append(Row(n, nbytes, p, m, 100.0 * p / m, open_s * 1e6))
    finally:
        conn.send(None)
        proc.join(30)
        importer.close()
        dst.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_plot_flag(ap)
    ap.add_argument(
        "--pool-blocks", type=int, default=1024, help="blocks in each pool (default 1024)"
    )
    ap.add_argument(
        "--budget-s", type=float, default=0.4, help="time per size and method (default 0.4)"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--transport", choices=["local", "nixl"], default="local",
        help="local: the same-node pull (shm / CUDA IPC); nixl: the cross-node pull (NIXL READ)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.pool_blocks < max(SIZES):
        ap.error(f"--pool-blocks must be at least {max(SIZES)}")
    if args.transport == "nixl":
        if args.device != "cpu":
            ap.error("--transport nixl: this benchmark moves DRAM (--device cpu)")
        from benchmarks.kv_transfer_nixl import main as nixl_main

        return nixl_main(LAYOUT, args.pool_blocks, args.budget_s, args.seed, args.json, args.plot)
    rows = run(args.device, args.pool_blocks, args.budget_s, args.seed)
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} torch threads"
    )
    print(
        f"KV transfer, {where}: {LAYOUT.describe()}, {LAYOUT.block_nbytes / 1024:.0f} KiB per block"
    )
    print(
        f"{'blocks':>6} {'MiB':>8} {'pull GB/s':>10} {'memcpy GB/s':>12} {'% memcpy':>9} {'open us':>8}"
    )
    for r in rows:
        print(
            f"{r.blocks:>6} {r.bytes / 2**20:>8.1f} {r.pull_gbps:>10.2f} {r.memcpy_gbps:>12.2f} "
            f"{r.pct_of_memcpy:>8.0f}% {r.open_us:>8.0f}"
        )
    head = rows[-1]
    ge16 = [r.pct_of_memcpy for r in rows if r.blocks >= 16]
    print(
        f"headline: {head.blocks} scattered blocks ({head.bytes / 2**20:.0f} MiB); from 16 blocks up "
        f"the pull runs at {min(ge16):.0f}-{max(ge16):.0f}% of memcpy"
    )
    payload = {
        "device": args.device,
        "where": where,
        "layout": asdict(LAYOUT),
        "block_nbytes": LAYOUT.block_nbytes,
        "rows": [asdict(r) for r in rows],
        "headline": asdict(head),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    if args.plot:
        write_plots(args.json, payload, "kv_transfer")
    print(f"kv transfer: {head.pull_gbps:.1f} GB/s = {head.pct_of_memcpy:.0f}% of memcpy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
