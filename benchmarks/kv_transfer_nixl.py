"""`python -m benchmarks.kv_transfer --transport nixl`: the cross-node KV pull through NIXL.

A spawned prefill-side process owns a plain pool (SmolLM2-135M's layout, as in
`benchmarks.kv_transfer`) registered with NIXL (`kv_manager.transfer.nixl.NixlPool`) and
exports leases; this process opens each descriptor with `KVImporterImpl` (the handle's tag
checked with the shared secret) and READs 1 ... 256 scattered blocks into its own pool.
Two phases, each in a fresh pair of processes (UCX reads its transport list at start):

- UCX's own choice of transports (shared memory / CMA on one machine), against a plain
  memcpy of the same bytes in this process;
- UCX forced to TCP (`UCX_TLS=tcp`, what a second node without RDMA sees), against a plain
  socket copy of the same bytes from the peer over loopback TCP (one request, `sendall`,
  `recv_into` the destination).

Pulls and references alternate (A B A B), medians are reported; the load average is recorded
before and after each phase. Last line:
`kv transfer nixl: {x} GB/s = {p}% of memcpy, tcp {q}% of socket copy` (the largest size).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass

import torch

from benchmarks.common import alternate_medians, spawn_peer
from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.nixl import NixlPool

_REQ = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class NixlRow:
    blocks: int
    bytes: int
    pull_gbps: float
    ref_gbps: float
    pct_of_ref: float


def prefill_side(conn, layout: KVLayout, num_blocks: int, secret: bytes) -> None:
    """The peer: a NIXL-registered pool of random bytes, an exporter, and a TCP server that
    sends the first n blocks' bytes on request (the socket-copy reference)."""
    torch.set_num_threads(1)
    pool = allocate_pool(layout, num_blocks, "cpu", shareable=False)
    flat = pool.tensor.view(-1).view(torch.int16)
    flat.copy_(torch.randint(-(2**15), 2**15, flat.shape, dtype=torch.int16))
    nixl = NixlPool(pool, "bench-prefill", secret)
    exporter = KVExporterImpl(nixl, layout, "bench-prefill", lease_ttl_s=3600.0)
    server = socket.create_server(("127.0.0.1", 0))
    conn.send(("ready", server.getsockname()[1]))
    peer, _ = server.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw = memoryview(pool.tensor.view(-1).view(torch.uint8).numpy())

    def serve_copies() -> None:
        while True:
            head = peer.recv(_REQ.size, socket.MSG_WAITALL)
            if len(head) < _REQ.size:
                return
            (n,) = _REQ.unpack(head)
            peer.sendall(raw[: n * layout.block_nbytes])

    threading.Thread(target=serve_copies, daemon=True).start()
    while True:
        msg = conn.recv()
        if msg is None:
            break
        digest = hashlib.sha256(pool.tensor[msg].view(torch.uint8).numpy().tobytes()).hexdigest()
        conn.send((exporter.export("bench", msg, len(msg) * layout.block_size, []), digest))
        exporter.poll_released()
    exporter.close()
    nixl.close()
    pool.close()


def run_phase(
    layout: KVLayout, sizes: list[int], tcp: bool, pool_blocks: int, budget_s: float, seed: int
) -> list[NixlRow]:
    secret = secrets.token_bytes(32)
    proc, conn, (_, port) = spawn_peer(prefill_side, layout, pool_blocks, secret)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    importer = KVImporterImpl(layout, secret=secret)
    dst = allocate_pool(layout, pool_blocks, "cpu", shareable=False)
    local_src = torch.empty_like(dst.tensor).copy_(dst.tensor)
    dst_raw = memoryview(dst.tensor.view(-1).view(torch.uint8).numpy())
    rng = random.Random(seed)
    rows = []
    try:
        for n in sizes:
            src_ids, dst_ids = rng.sample(range(pool_blocks), n), rng.sample(range(pool_blocks), n)
            conn.send(src_ids)
            raw, digest = conn.recv()
            desc = importer.open(raw)
            nbytes = n * layout.block_nbytes

            def pull(desc=desc, dst_ids=dst_ids) -> None:
                importer.pull(desc, dst.tensor, dst_ids)

            def memcpy(n=n) -> None:
                dst.tensor[:n].copy_(local_src[:n])

            def socket_copy(nbytes=nbytes) -> None:
                sock.sendall(_REQ.pack(nbytes // layout.block_nbytes))
                view, got = dst_raw[:nbytes], 0
                while got < nbytes:
                    got += sock.recv_into(view[got:], nbytes - got)

            pulls, refs = alternate_medians(pull, socket_copy if tcp else memcpy, budget_s, max_reps=400)
            pull()  # the reference wrote over some destination blocks: check a fresh pull
            got = hashlib.sha256(dst.tensor[dst_ids].view(torch.uint8).numpy().tobytes()).hexdigest()
            if got != digest:
                raise RuntimeError(f"blocks read through NIXL differ from the source at {n} blocks")
            importer.release(desc)
            p, r = nbytes / pulls / 1e9, nbytes / refs / 1e9
            rows.append(NixlRow(n, nbytes, p, r, 100.0 * p / r))
    finally:
        conn.send(None)
        sock.close()
        proc.join(30)
        importer.close()
        dst.close()
    return rows


def phase_in_subprocess(tcp: bool, pool_blocks: int, budget_s: float, seed: int) -> dict:
    """One phase in a fresh interpreter (UCX_TLS set for the tcp phase), with load averages."""
    env = dict(os.environ)
    if tcp:
        env["UCX_TLS"] = "tcp"
    else:
        env.pop("UCX_TLS", None)
    code = (
        "import json, sys; from dataclasses import asdict; "
        "from benchmarks.kv_transfer import LAYOUT, SIZES; "
        "from benchmarks.kv_transfer_nixl import run_phase; "
        f"rows = run_phase(LAYOUT, SIZES, {tcp}, {pool_blocks}, {budget_s}, {seed}); "
        "print('ROWS ' + json.dumps([asdict(r) for r in rows]))"
    )
    load_before = os.getloadavg()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    load_after = os.getloadavg()
    lines = [line for line in out.stdout.splitlines() if line.startswith("ROWS ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"nixl phase (tcp={tcp}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return {
        "ucx_tls": "tcp" if tcp else "(UCX's choice)",
        "reference": "socket copy" if tcp else "memcpy",
        "rows": json.loads(lines[-1][5:]),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def main(
    layout: KVLayout, pool_blocks: int, budget_s: float, seed: int, json_path: str | None, plot: bool = False
) -> int:
    phases = {
        "default": phase_in_subprocess(False, pool_blocks, budget_s, seed),
        "tcp": phase_in_subprocess(True, pool_blocks, budget_s, seed),
    }
    print(f"KV transfer over NIXL (UCX), cpu: {layout.describe()}, {layout.block_nbytes / 1024:.0f} KiB per block")
    for phase in phases.values():
        busy = max(phase["loadavg_before"][0], phase["loadavg_after"][0]) > (os.cpu_count() or 1) * 0.75
        print(
            f"UCX_TLS={phase['ucx_tls']} vs {phase['reference']}; load average "
            f"{phase['loadavg_before'][0]:.2f} -> {phase['loadavg_after'][0]:.2f}"
            + ("  (cores were shared: figures are not reliable)" if busy else "")
        )
        print(f"{'blocks':>6} {'MiB':>8} {'nixl GB/s':>10} {'ref GB/s':>9} {'% ref':>6}")
        for r in phase["rows"]:
            print(
                f"{r['blocks']:>6} {r['bytes'] / 2**20:>8.1f} {r['pull_gbps']:>10.2f} "
                f"{r['ref_gbps']:>9.2f} {r['pct_of_ref']:>5.0f}%"
            )
        ge16 = [r["pct_of_ref"] for r in phase["rows"] if r["blocks"] >= 16]
        print(f"  from 16 blocks up: {min(ge16):.0f}-{max(ge16):.0f}% of {phase['reference']}")
    head, tcp = phases["default"]["rows"][-1], phases["tcp"]["rows"][-1]
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"transport": "nixl", "layout": asdict(layout), "phases": phases}, f, indent=2)
    if plot:
        from benchmarks.plots import write_plots

        write_plots(json_path, {"benchmark": "kv_transfer_nixl", "results": phases}, "kv_transfer_nixl")
    print(
        f"kv transfer nixl: {head['pull_gbps']:.1f} GB/s = {head['pct_of_ref']:.0f}% of memcpy, "
        f"tcp {tcp['pct_of_ref']:.0f}% of socket copy"
    )
    return 0
