"""TensorRT-LLM's DisaggregatedParams inside Trident's KV descriptor, under Trident's leases.

The context-only result's parameters are written from `tensorrt_llm/disaggregated_params.py`
(TensorRT-LLM 1.1.0: request_type, first_gen_tokens, ctx_request_id, opaque_state,
draft_tokens; the newer disagg_request_id / ctx_dp_rank / ctx_info_endpoint when present).
The leases, descriptors and release sockets are Trident's real ones (`kv_manager.transfer`),
between two handoffs of this process, as between a prefill and a decode worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from kv_manager.hashing import hash_blocks
from kv_manager.layout import KVLayout
from kv_manager.transfer import KVExporterImpl, KVImporterImpl, allocate_pool
from kv_manager.transfer.descriptor import decode_descriptor
from plugins.trtllm import disagg
from plugins.trtllm.handoff import TrtllmHandoff, layout_of
from trident.core.errors import KVTransferError, ValidationError
from trident.core.types import GenerateRequest

LAYOUT = KVLayout(
    num_layers=30, num_kv_heads=3, head_dim=64, block_size=32, dtype="bfloat16", model_id="SmolLM2"
)
PROMPT = tuple(range(1000, 1070))  # 70 tokens: 3 blocks of 32


@dataclass
class DisaggregatedParams:  # the fields of tensorrt_llm.disaggregated_params.DisaggregatedParams read here
    request_type: str | None = None
    first_gen_tokens: list | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list | None = None


CONTEXT = DisaggregatedParams("context_only", [9], 123456, b"\x00\x01transceiver-state\xff", None)


@pytest.fixture
def pair():
    prefill = TrtllmHandoff(LAYOUT, "prefill", 2048, shareable=True, lease_ttl_s=30)
    decode = TrtllmHandoff(LAYOUT, "decode", 2048, shareable=False, lease_ttl_s=30)
    yield prefill, decode
    prefill.close()
    decode.close()


def _decode_request(descriptor: bytes, first_token: int = 9) -> GenerateRequest:
    return GenerateRequest("r1", PROMPT, kv_descriptor=descriptor, first_token=first_token)


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_params_travel_in_the_descriptor_and_become_generation_only(pair) -> None:
    prefill, decode = pair
    descriptor = prefill.export("r1", PROMPT, CONTEXT)
    desc = decode_descriptor(descriptor)  # Trident's own descriptor, as the router carries it
    assert (
        desc.num_tokens == 70
        and desc.block_ids == (0, 1, 2)
        and desc.fingerprint == LAYOUT.fingerprint()
    )
    assert desc.block_hashes == tuple(hash_blocks(list(PROMPT), 32))
    assert prefill.num_leases() == 1 and prefill.held_blocks() == 3
    _, kwargs = decode.check(_decode_request(descriptor))
    assert kwargs == {
        "request_type": "generation_only",
        "first_gen_tokens": [9],
        "ctx_request_id": 123456,
        "opaque_state": b"\x00\x01transceiver-state\xff",
    }


def test_release_ends_the_lease_on_the_prefill_worker(pair) -> None:
    prefill, decode = pair
    desc, _ = decode.check(_decode_request(prefill.export("r1", PROMPT, CONTEXT)))
    decode.release(desc)
    assert _wait_for(lambda: (prefill.poll(), prefill.num_leases())[1] == 0)
    assert prefill.held_blocks() == 0


def test_revoke_ends_a_lease_never_handed_over(pair) -> None:
    prefill, _ = pair
    prefill.export("r1", PROMPT, CONTEXT)
    prefill.revoke("r1")
    assert prefill.num_leases() == 0


def test_an_expired_lease_is_refused_and_freed() -> None:
    prefill = TrtllmHandoff(LAYOUT, "prefill", 2048, shareable=True, lease_ttl_s=0.05)
    decode = TrtllmHandoff(LAYOUT, "decode", 2048, shareable=False, lease_ttl_s=30)
    try:
        descriptor = prefill.export("r1", PROMPT, CONTEXT)
        time.sleep(0.1)
        with pytest.raises(ValidationError, match="expired") as err:
            decode.check(_decode_request(descriptor))
        assert err.value.field == "kv_descriptor"
    finally:
        prefill.close()
        decode.close()


def test_bad_decode_requests_name_their_field(pair) -> None:
    prefill, decode = pair
    descriptor = prefill.export("r1", PROMPT, CONTEXT)
    with pytest.raises(ValidationError) as err:
        decode.check(_decode_request(descriptor, first_token=10))
    assert err.value.field == "kv_descriptor" and "first_gen_tokens" in str(err.value)
    with pytest.raises(ValidationError) as err:
        decode.check(GenerateRequest("r1", PROMPT[:40], kv_descriptor=descriptor, first_token=9))
    assert err.value.field == "kv_descriptor" and "covers 70 tokens" in str(err.value)
    with pytest.raises(ValidationError) as err:
        decode.check(GenerateRequest("r1", PROMPT, kv_descriptor=descriptor))
    assert err.value.field == "first_token"
    other = TrtllmHandoff(
        KVLayout(30, 3, 64, 32, "float16", "SmolLM2"),
        "decode2",
        2048,
        shareable=False,
        lease_ttl_s=30,
    )
    try:
        with pytest.raises(ValidationError, match="layout mismatch"):
            other.check(_decode_request(descriptor))
    finally:
        other.close()


def test_torch_and_trtllm_descriptors_are_refused_by_each_other(pair) -> None:
    prefill, decode = pair
    # a torch engine's descriptor (a real shared-memory pool) on a TensorRT-LLM decode worker
    pool = allocate_pool(LAYOUT, 4, "cpu", shareable=True)
    exporter = KVExporterImpl(pool, LAYOUT, "torch-prefill")
    importer = KVImporterImpl(LAYOUT)
    try:
        torch_descriptor = exporter.export("t1", [0, 1, 2], 70, [])
        with pytest.raises(ValidationError, match="not a TensorRT-LLM handoff"):
            decode.check(_decode_request(torch_descriptor))
        # a TensorRT-LLM descriptor on a torch (or vLLM) decode worker's importer
        with pytest.raises(KVTransferError, match="unknown kind 'trtllm'"):
            importer.open(prefill.export("r1", PROMPT, CONTEXT))
    finally:
        importer.close()
        exporter.close()
        pool.close()


def test_params_from_output_checks_what_tensorrt_llm_returned() -> None:
    with pytest.raises(KVTransferError, match="no disaggregated_params"):
        disagg.params_from_output(None)
    with pytest.raises(KVTransferError, match="ctx_request_id"):
        disagg.params_from_output(DisaggregatedParams("context_only", [9]))
    with pytest.raises(KVTransferError, match="params.opaque_state"):
        disagg.params_from_output(DisaggregatedParams("context_only", [9], 1, "not bytes"))
    # newer optional fields travel too; request_type is set by the decode side
    newer = {
        "request_type": "context_only",
        "first_gen_tokens": (9,),
        "ctx_request_id": 5,
        "disagg_request_id": 77,
        "ctx_dp_rank": 0,
        "ctx_info_endpoint": "tcp://10.0.0.2:5555",
    }
    fields = disagg.params_from_output(newer)
    assert fields == {
        "first_gen_tokens": [9],
        "ctx_request_id": 5,
        "disagg_request_id": 77,
        "ctx_dp_rank": 0,
        "ctx_info_endpoint": "tcp://10.0.0.2:5555",
    }
    layout, back = disagg.decode_handle(disagg.encode_handle(LAYOUT, fields))
    assert layout == LAYOUT and back == fields


def test_a_corrupt_handle_is_refused_naming_the_field() -> None:
    import msgpack

    bad = msgpack.packb(
        {
            "v": 1,
            "kind": "trtllm",
            "layout": [1, 1, 1, 1, "float32", "m"],
            "params": {"ctx_request_id": "x"},
        }
    )
    with pytest.raises(KVTransferError, match="params.ctx_request_id"):
        disagg.decode_handle(bad)
    bad = msgpack.packb(
        {"v": 1, "kind": "trtllm", "layout": [1, 1, 1, 1, "float32", "m"], "params": {"evil": 1}}
    )
    with pytest.raises(KVTransferError, match="params.evil"):
        disagg.decode_handle(bad)
    with pytest.raises(KVTransferError, match="layout"):
        disagg.decode_handle(msgpack.packb({"v": 1, "kind": "trtllm", "layout": [1], "params": {}}))


def test_layout_of_a_hugging_face_config() -> None:
    hf = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "torch_dtype": "bfloat16",
    }
    assert layout_of(hf, 32, "auto", "SmolLM2") == LAYOUT
    assert layout_of({**hf, "head_dim": 128}, 32, "float16", "m").head_dim == 128
    with pytest.raises(KVTransferError, match="config.json"):
        layout_of({"hidden_size": 1}, 32, "auto", "m")
