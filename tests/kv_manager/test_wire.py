"""The KV event wire format: vLLM's layouts in, vLLM's layout out, clear errors otherwise."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest

from kv_manager import wire
from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from trident.core.errors import ValidationError

STORED = BlockStored((11, 12), 10, tuple(range(8)), 4, None, "GPU")
REMOVED = BlockRemoved((11,), "CPU")


# vLLM's structs (vllm/distributed/kv_events.py, the array_like release), to check that its
# own msgspec decoder reads what we encode and that we read what it encodes.
class _VllmBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _VllmEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStoredV(_VllmEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemovedV(_VllmEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class AllBlocksClearedV(_VllmEvent, tag="AllBlocksCleared"):
    pass


class _VllmKVEventBatch(_VllmBatch):
    events: list[BlockStoredV | BlockRemovedV | AllBlocksClearedV]


def test_encode_is_vllm_array_layout() -> None:
    payload = wire.encode_batch(
        [STORED, REMOVED, AllBlocksCleared()], ts=1.25, data_parallel_rank=3
    )
    assert msgpack.unpackb(payload) == [
        1.25,
        [
            ["BlockStored", [11, 12], 10, list(range(8)), 4, None, "GPU"],
            ["BlockRemoved", [11], "CPU"],
            ["AllBlocksCleared"],
        ],
        3,
    ]
    batch = msgspec.msgpack.decode(payload, type=_VllmKVEventBatch)
    assert batch.data_parallel_rank == 3
    assert batch.events[0] == BlockStoredV([11, 12], 10, list(range(8)), 4, None, "GPU")
    assert batch.events[1] == BlockRemovedV([11], "CPU")
    assert isinstance(batch.events[2], AllBlocksClearedV)


def test_decode_what_vllm_encodes() -> None:
    payload = msgspec.msgpack.encode(
        _VllmKVEventBatch(
            ts=2.0,
            events=[
                BlockStoredV([1, 2], None, [5] * 8, 4, 7, "GPU"),
                BlockRemovedV([2], None),
                AllBlocksClearedV(),
            ],
        )
    )
    batch = wire.decode_batch(payload)
    assert batch.ts == 2.0 and batch.data_parallel_rank is None
    assert batch.events == (
        BlockStored((1, 2), None, (5,) * 8, 4, 7, "GPU"),
        BlockRemoved((2,), None),
        AllBlocksCleared(),
    )


def test_roundtrip() -> None:
    batch = wire.decode_batch(wire.encode_batch([STORED, REMOVED, AllBlocksCleared()], ts=9.0))
    assert batch == wire.EventBatch(9.0, (STORED, REMOVED, AllBlocksCleared()), 0)


def test_older_layout_without_medium_and_rank() -> None:
    payload = msgpack.packb(
        [1.0, [["BlockStored", [1], None, [0, 1], 2, None], ["BlockRemoved", [1]]]]
    )
    batch = wire.decode_batch(payload)
    assert batch.data_parallel_rank is None
    assert batch.events == (
        BlockStored((1,), None, (0, 1), 2, None, "GPU"),
        BlockRemoved((1,), "GPU"),
    )


def test_newer_layout_trailing_fields_and_map_form() -> None:
    # newer vLLM adds lora_name, extra_keys, group_idx, ... after medium
    arr = msgpack.packb(
        [
            1.0,
            [
                ["BlockStored", [1], None, [0, 1], 2, None, "GPU", "lora-a", None, 0],
                ["BlockRemoved", [1], "GPU", 0],
            ],
            0,
        ]
    )
    assert wire.decode_batch(arr).events == (BlockStored((1,), None, (0, 1), 2), BlockRemoved((1,)))
    as_map = msgpack.packb(
        {
            "ts": 1.0,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": [0, 1],
                    "block_size": 2,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                },
                {"type": "AllBlocksCleared"},
            ],
            "data_parallel_rank": 1,
        }
    )
    batch = wire.decode_batch(as_map)
    assert batch.data_parallel_rank == 1
    assert batch.events == (BlockStored((1,), None, (0, 1), 2), AllBlocksCleared())


def test_signed_and_bytes_hashes_fold_to_u64() -> None:
    digest = bytes(range(32))
    payload = msgpack.packb([0.0, [["BlockStored", [-1, digest], -2, [], 4, None, "GPU"]], 0])
    (event,) = wire.decode_batch(payload).events
    assert event.block_hashes == ((1 << 64) - 1, int.from_bytes(digest[-8:], "big"))
    assert event.parent_block_hash == (1 << 64) - 2


def test_unknown_event_types_are_skipped() -> None:
    payload = msgpack.packb([0.0, [["SomethingNew", 1, 2], ["AllBlocksCleared"]], 0])
    assert wire.decode_batch(payload).events == (AllBlocksCleared(),)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\xc1", "payload"),
        (msgpack.packb("nope"), "payload"),
        (msgpack.packb(["x", []]), "ts"),
        (msgpack.packb([0.0, {}]), "events"),
        (
            msgpack.packb([0.0, [["BlockStored", "h", None, [], 4, None, "GPU"]]]),
            "events[0].block_hashes",
        ),
        (
            msgpack.packb([0.0, [["AllBlocksCleared"], ["BlockStored", [1], None, [], 0]]]),
            "events[1].block_size",
        ),
        (msgpack.packb([0.0, [["BlockStored", [1], None, [-3], 4]]]), "events[0].token_ids"),
        (msgpack.packb([0.0, [["BlockStored", [1], None]]]), "events[0].token_ids"),
        (msgpack.packb([0.0, [["BlockRemoved", [1], 5]]]), "events[0].medium"),
        (msgpack.packb([0.0, [[7]]]), "events[0].type"),
    ],
)
def test_bad_batches_name_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        wire.decode_batch(payload)
    assert err.value.field == field


def test_frames() -> None:
    frames = wire.pack_frames(b"kv", 258, b"x")
    assert frames == [b"kv", b"\x00\x00\x00\x00\x00\x00\x01\x02", b"x"]
    assert wire.unpack_frames(frames) == (b"kv", 258, b"x")
    with pytest.raises(ValidationError, match="frames"):
        wire.unpack_frames([b"kv", b"x"])
    with pytest.raises(ValidationError, match="seq"):
        wire.unpack_frames([b"kv", b"\x01", b"x"])


def test_load_and_control_roundtrip() -> None:
    report = wire.LoadReport(
        "decode_1", "abc", 5.0, 10, 100, 2, 1, 64, 7, 16, "tcp://127.0.0.1:9", 12
    )
    assert wire.decode_load(wire.encode_load(report)) == report
    control = wire.WorkerControl(wire.LEAVE, "decode", "abc", 1.0, 16, "", 3)
    assert wire.decode_control(wire.encode_control(control)) == control


def test_bad_load_and_control() -> None:
    with pytest.raises(ValidationError) as err:
        wire.decode_load(msgpack.packb({"worker_id": "w", "instance": "i", "ts": 1.0}))
    assert err.value.field == "load.active_blocks"
    with pytest.raises(ValidationError) as err:
        wire.decode_load(msgpack.packb({"worker_id": 3}))
    assert err.value.field == "load.worker_id"
    with pytest.raises(ValidationError) as err:
        wire.decode_control(
            msgpack.packb({"kind": "dance", "worker_id": "w", "instance": "i", "ts": 1.0})
        )
    assert err.value.field == "control.kind"
