"""Our `structured_outputs` spec as vLLM's `StructuredOutputsParams`, and what the vLLM
engine refuses (without starting vLLM's engine)."""

from __future__ import annotations

import json

import pytest

from plugins.vllm.setup import sampling_params
from plugins.vllm.structured import check_structured, structured_outputs_params
from trident.core.errors import ValidationError
from trident.core.structured import structured_outputs_text
from trident.core.types import GenerateRequest, SamplingParams

pytest.importorskip("vllm")


def test_each_kind_maps_one_for_one() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = structured_outputs_params(structured_outputs_text("json", schema))
    assert json.loads(got.json) == schema and got.regex is None
    assert structured_outputs_params(structured_outputs_text("regex", "a+")).regex == "a+"
    assert structured_outputs_params(structured_outputs_text("choice", ["x", "y"])).choice == [
        "x",
        "y",
    ]
    assert (
        structured_outputs_params(structured_outputs_text("json_object", True)).json_object is True
    )
    assert (
        structured_outputs_params(structured_outputs_text("grammar", 'root ::= "a"')).grammar
        == 'root ::= "a"'
    )
    assert structured_outputs_params(None) is None
    vllm_sp = sampling_params(
        SamplingParams(structured_outputs=structured_outputs_text("regex", "[0-9]+"))
    )
    assert vllm_sp.structured_outputs.regex == "[0-9]+"


def test_what_the_vllm_worker_refuses_names_the_field() -> None:
    sp = SamplingParams(structured_outputs=structured_outputs_text("regex", "a+"))
    check_structured(GenerateRequest("plain", (1, 2), SamplingParams()), has_tokenizer=False)
    for request, tokenizer in (
        (GenerateRequest("a", (1, 2), sp), False),
        (GenerateRequest("b", (1, 2), sp, kv_descriptor=b"x", first_token=3), True),
        (GenerateRequest("c", (1, 2), sp, output_offset=1), True),
    ):
        with pytest.raises(ValidationError) as err:
            check_structured(request, has_tokenizer=tokenizer)
        assert err.value.field == "structured_outputs"
    check_structured(GenerateRequest("d", (1, 2), sp), has_tokenizer=True)
