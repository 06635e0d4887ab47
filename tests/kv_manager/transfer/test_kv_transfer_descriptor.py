"""Descriptor and pool-handle bytes: round trips and refusals that name the bad field."""

from __future__ import annotations

import msgpack
import pytest

from kv_manager.layout import KVLayout
from kv_manager.transfer import KVDescriptor, decode_descriptor, encode_descriptor
from kv_manager.transfer.descriptor import DESCRIPTOR_VERSION
from kv_manager.transfer.handle import PoolHandle, decode_handle, encode_handle
from trident.core.errors import KVTransferError

LAYOUT = KVLayout(30, 3, 64, 16, "bfloat16", "SmolLM2-135M-Instruct")
DESC = KVDescriptor(
    worker_id="prefill_0",
    pool_handle=b"\x01\x02handle",
    fingerprint=LAYOUT.fingerprint(),
    block_ids=(7, 3, 9),
    num_tokens=40,
    block_hashes=(2**64 - 1, 12345),
    lease_id="ab" * 16,
    lease_expiry=1_900_000_000.25,
    release_addr="ipc:///tmp/trident_kvrel_x/release",
)


def _body(**changes) -> bytes:
    raw = encode_descriptor(DESC)
    body = msgpack.unpackb(raw[1:], raw=False)
    body.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del body[key]
    return raw[:1] + msgpack.packb(body, use_bin_type=True)


_DROP = object()


def test_round_trip_is_exact():
    raw = encode_descriptor(DESC)
    assert raw[0] == DESCRIPTOR_VERSION
    assert decode_descriptor(raw) == DESC
    assert len(raw) < 300


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"block_ids": [1, -1]}, "block_ids"),
        ({"block_ids": []}, "block_ids"),
        ({"block_ids": "1,2"}, "block_ids"),
        ({"block_hashes": [-1]}, "block_hashes"),
        ({"block_hashes": [1, 2, 3, 4]}, "block_hashes"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_tokens": True}, "num_tokens"),
        ({"lease_expiry": "soon"}, "lease_expiry"),
        ({"lease_expiry": float("nan")}, "lease_expiry"),
        ({"release_addr": "http://evil"}, "release_addr"),
        ({"pool_handle": "text"}, "pool_handle"),
        ({"lease_id": ""}, "lease_id"),
        ({"fingerprint": _DROP}, "fingerprint"),
    ],
)
def test_bad_fields_are_named(changes, field):
    with pytest.raises(KVTransferError, match=field):
        decode_descriptor(_body(**changes))


@pytest.mark.parametrize(
    "raw", [b"", b"\x09" + b"x", b"\x01\xc1garbage", b"\x01\x93\x01\x02\x03", "str"]
)
def test_garbage_is_refused(raw):
    with pytest.raises(KVTransferError, match="descriptor"):
        decode_descriptor(raw)


def test_other_version_names_both():
    raw = encode_descriptor(DESC)
    with pytest.raises(KVTransferError, match=r"version 2 not supported .*speaks 1"):
        decode_descriptor(b"\x02" + raw[1:])


def test_handle_round_trip_and_checks():
    h = PoolHandle("shm", "f" * 32, 42, LAYOUT, 8, shm_name="trident_kv_42_" + "f" * 32)
    back = decode_handle(encode_handle(h))
    assert back == h and back.nbytes == 8 * LAYOUT.block_nbytes
    bad = PoolHandle("shm", "f" * 32, 42, LAYOUT, 8, shm_name="../etc/passwd")
    with pytest.raises(KVTransferError, match="shm_name"):
        decode_handle(encode_handle(bad))
    with pytest.raises(KVTransferError, match="pool_handle"):
        decode_handle(b"\xc1")
    cuda = PoolHandle("cuda", "a" * 32, 1, LAYOUT, 8, device_uuid="GPU-x", cuda_ipc=(0, b"h"))
    with pytest.raises(KVTransferError, match="cuda_ipc"):
        decode_handle(encode_handle(cuda))
