"""A stand-in vLLM worker for the interop test, run as a separate process.

It publishes KV events exactly as vLLM's `ZmqEventPublisher` puts them on the wire, built by
hand with msgpack and pyzmq (nothing from Trident is imported): multipart
`[topic, seq (8 bytes big-endian), msgpack([ts, [events...], data_parallel_rank])]` with
msgspec's array_like tagged events, vLLM's own block hashes (sha256-based, sent as signed
64-bit ints), and vLLM's replay protocol on a ROUTER socket (request: 8-byte start seq;
replies `[seq, payload]` ..., then `[-1 as 8 bytes, b""]`).

Script: print the endpoints as one JSON line; wait for a subscriber (XPUB sees the
subscription; on the wire it is a PUB); publish batches 0, 1, 2, keep batch 3 only in the
replay buffer (as if the network lost it), publish 4; then serve replay requests and the
commands read from stdin: "clear" publishes AllBlocksCleared, "quit" exits.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time

import msgpack
import zmq

BLOCK_SIZE = 16
PROMPT_A = list(range(1000, 1000 + 8 * BLOCK_SIZE))  # 8 blocks
PROMPT_B = PROMPT_A[: 2 * BLOCK_SIZE] + list(range(5000, 5000 + 4 * BLOCK_SIZE))  # shares 2
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def vllm_hashes(tokens: list[int], parent: int | None) -> list[int]:
    """Chained sha256 block hashes, folded to signed int64 (not the router's scheme)."""
    out = []
    for i in range(0, len(tokens), BLOCK_SIZE):
        data = struct.pack("<q", parent or 0) + struct.pack(
            f"<{BLOCK_SIZE}I", *tokens[i : i + BLOCK_SIZE]
        )
        parent = struct.unpack(">q", hashlib.sha256(data).digest()[:8])[0]
        out.append(parent)
    return out


def main() -> int:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    replay = ctx.socket(zmq.ROUTER)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    replay_port = replay.bind_to_random_port("tcp://127.0.0.1")
    print(
        json.dumps(
            {"events": f"tcp://127.0.0.1:{pub_port}", "replay": f"tcp://127.0.0.1:{replay_port}"}
        ),
        flush=True,
    )
    if not pub.poll(30_000):
        return 2
    pub.recv()  # the subscription

    ha = vllm_hashes(PROMPT_A, None)
    hb = vllm_hashes(PROMPT_B[2 * BLOCK_SIZE :], ha[1])
    batches = [
        # current array layout: block_hashes, parent, token_ids, block_size, lora_id, medium
        [
            time.time(),
            [["BlockStored", ha[:4], None, PROMPT_A[: 4 * BLOCK_SIZE], BLOCK_SIZE, None, "GPU"]],
            0,
        ],
        [
            time.time(),
            [["BlockStored", ha[4:], ha[3], PROMPT_A[4 * BLOCK_SIZE :], BLOCK_SIZE, None, "GPU"]],
            0,
        ],
        # an older release: no medium, no data_parallel_rank
        [time.time(), [["BlockStored", hb, ha[1], PROMPT_B[2 * BLOCK_SIZE :], BLOCK_SIZE, None]]],
        [time.time(), [["BlockRemoved", ha[6:], "GPU"]], 0],  # "lost" on the live stream
        # a newer release: trailing lora_name, extra_keys, group_idx, ...
        [
            time.time(),
            [
                [
                    "BlockStored",
                    [12345],
                    None,
                    [7] * BLOCK_SIZE,
                    BLOCK_SIZE,
                    None,
                    "GPU",
                    None,
                    None,
                    0,
                ]
            ],
            0,
        ],
    ]
    buffer = [(seq, msgpack.packb(batch)) for seq, batch in enumerate(batches)]
    for seq, payload in buffer:
        if seq != 3:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    poller = zmq.Poller()
    poller.register(replay, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            if sock is replay:
                ident, _, start = replay.recv_multipart()
                first = int.from_bytes(start, "big")
                for seq, payload in buffer:
                    if seq >= first:
                        replay.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
                replay.send_multipart([ident, b"", END_SEQ, b""])
                continue
            command = sys.stdin.readline().strip()
            if command == "clear":
                seq = len(buffer)
                payload = msgpack.packb([time.time(), [["AllBlocksCleared"]], 0])
                buffer.append((seq, payload))
                pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            elif command in ("quit", ""):
                ctx.destroy(linger=0)
                return 0
    ctx.destroy(linger=0)
    return 1


if __name__ == "__main__":
    sys.exit(main())
