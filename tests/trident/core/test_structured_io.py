"""`structured_outputs` and `tools` through the router's and the workers' tensor codecs, and
the router handing `tools` to a chat template that renders them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.text.tokenizer import Tokenizer, load_tokenizer
from trident.core.errors import ValidationError
from trident.core.router_io import RouterRequest, encode_router_inputs, parse_router_inputs
from trident.core.structured import structured_outputs_text
from trident.core.types import GenerateRequest, SamplingParams
from trident.core.worker_io import encode_generate_inputs, parse_generate_inputs

SPEC = structured_outputs_text("json", {"type": "object", "properties": {"a": {"type": "integer"}}})
TOOLS = ({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},)
CHAT = ({"role": "user", "content": "hi"},)

# A Hermes-style template (as Qwen2.5's and SmolLM3's): tools in the system turn.
HERMES = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_router_inputs_carry_the_spec_and_tools() -> None:
    req = RouterRequest(SamplingParams(structured_outputs=SPEC), messages=CHAT, tools=TOOLS)
    back = parse_router_inputs(encode_router_inputs(req))
    assert back.sampling.structured_outputs == SPEC and back.tools == TOOLS
    plain = parse_router_inputs(
        encode_router_inputs(RouterRequest(SamplingParams(), text_input="x"))
    )
    assert plain.sampling.structured_outputs is None and plain.tools is None


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"text_input": "x", "tools": json.dumps(list(TOOLS))}, "tools"),
        ({"messages": json.dumps(list(CHAT)), "tools": "{}"}, "tools"),
        ({"messages": json.dumps(list(CHAT)), "tools": "[1]"}, "tools"),
        ({"text_input": "x", "structured_outputs": '{"regex": 5}'}, "structured_outputs.regex"),
        ({"text_input": "x", "structured_outputs": "nope"}, "structured_outputs"),
    ],
)
def test_bad_router_inputs_name_the_field(inputs: dict[str, str], field: str) -> None:
    arrays = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    with pytest.raises(ValidationError) as err:
        parse_router_inputs(arrays)
    assert err.value.field == field


def test_worker_inputs_carry_the_spec() -> None:
    req = GenerateRequest(
        "r", (1, 2, 3), SamplingParams(structured_outputs=SPEC), kv_descriptor=b"d", first_token=7
    )
    back = parse_generate_inputs(encode_generate_inputs(req), "x")
    assert isinstance(back, GenerateRequest) and back.sampling.structured_outputs == SPEC


def test_the_router_renders_tools_with_a_template_that_takes_them() -> None:
    base = load_tokenizer("")
    tok = Tokenizer(
        base.backend,
        model_id="hermes",
        chat_template=HERMES,
        special_tokens={},
        eos_token_ids=base.eos_token_ids,
        bos_token_id=None,
    )
    orchestrator = Orchestrator(tok, None, None)  # type: ignore[arg-type]
    with_tools = tok.decode(
        orchestrator.prompt_ids(RouterRequest(SamplingParams(), messages=CHAT, tools=TOOLS)),
        skip_special_tokens=False,
    )
    assert '<tools>{"type": "function", "function": {"name": "f"' in with_tools
    without = tok.decode(
        orchestrator.prompt_ids(RouterRequest(SamplingParams(), messages=CHAT)),
        skip_special_tokens=False,
    )
    assert "<tools>" not in without and without.endswith("<|im_start|>assistant\n")
