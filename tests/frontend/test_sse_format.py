"""SSE framing and the JSON shapes of chunks, whole responses and usage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from frontend.errors import APIError
from frontend.metrics import FrontendMetrics
from frontend.serving import SSE_DONE, Generation, ResponseShape, sse
from frontend.triton_client import (
    _infer_inputs,
    _parse,
    model_id_from_parameters,
    model_id_from_path,
)
from trident.core.router_io import (
    RouterDelta,
    RouterRequest,
    encode_router_inputs,
    encode_router_outputs,
)
from trident.core.types import SamplingParams


def _delta(text: str, out: int, finish: str = "", ids: tuple[int, ...] = (1,)) -> RouterDelta:
    return RouterDelta(
        text,
        ids,
        finish,
        num_input_tokens=10,
        num_output_tokens=out,
        cached_tokens=4,
        worker="decode",
    )


def test_sse_framing() -> None:
    event = sse({"a": "é"})
    assert event == 'data: {"a":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_chat_chunks_and_usage() -> None:
    metrics = FrontendMetrics()
    requests = [
        RouterRequest(SamplingParams(), request_id=f"r-{i}", text_input="x", stream=True)
        for i in range(2)
    ]
    gen = Generation(None, requests, {}, metrics, "m", n=2)  # type: ignore[arg-type]
    gen._record(gen.choices[0], _delta("Hel", 1))
    gen._record(gen.choices[0], _delta("lo", 2, "stop"))
    gen._record(gen.choices[1], _delta("Hi", 1, "length"))
    shape = ResponseShape(True, "chatcmpl-1", "m", 123)
    full = shape.full(gen)
    assert full["object"] == "chat.completion"
    assert [c["message"]["content"] for c in full["choices"]] == ["Hello", "Hi"]
    assert [c["finish_reason"] for c in full["choices"]] == ["stop", "length"]
    # Both choices share one prompt: it is counted once.
    assert full["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    role = shape.chunk(0, None, None, role=True)
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert shape.chunk(1, "x", "stop")["choices"][0] == {
        "index": 1,
        "delta": {"content": "x"},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert shape.usage_chunk(full["usage"])["choices"] == []
    assert metrics.ttft.count("m") == 2 and metrics.itl.count("m") == 1
    json.dumps(full)


def test_completion_shape_with_echo() -> None:
    metrics = FrontendMetrics()
    gen = Generation(
        None,
        [RouterRequest(SamplingParams(), request_id="r", text_input="x", stream=False)],
        {},
        metrics,
        "m",
        n=1,
    )  # type: ignore[arg-type]
    gen._record(gen.choices[0], _delta(" world", 1, "stop"))
    shape = ResponseShape(False, "cmpl-1", "m", 1, echo=["hello"])
    full = shape.full(gen)
    assert full["object"] == "text_completion"
    assert full["choices"][0]["text"] == "hello world"
    assert metrics.ttft.count("m") == 0  # one response per request: no per-token timing
    assert shape.chunk(0, "x", None)["choices"][0] == {
        "index": 0,
        "text": "x",
        "logprobs": None,
        "finish_reason": None,
    }


def test_model_id_discovery_from_config_parameters() -> None:
    assert model_id_from_path("/a/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert model_id_from_path("/models/Llama-3.2-1B/") == "Llama-3.2-1B"
    assert (
        model_id_from_parameters(
            {"model_id": {"string_value": "X"}, "model": {"string_value": "/p/Y.gguf"}}
        )
        == "X"
    )
    assert model_id_from_parameters({"model": {"string_value": "${model}"}}) is None
    assert model_id_from_parameters({"model": {"string_value": "/p/Y.F16.gguf"}}) == "Y"


def test_router_tensors_follow_the_contract() -> None:
    """The gRPC inputs carry each table datatype; responses decode into `RouterDelta`s."""
    req = RouterRequest(SamplingParams(seed=1, temperature=0.0), input_ids=(1, 2), request_id="r")
    inputs = {t.name(): t.datatype() for t in _infer_inputs(encode_router_inputs(req))}
    assert inputs == {
        "input_ids": "INT32",
        "temperature": "FP32",
        "seed": "UINT64",
        "request_id": "BYTES",
    }

    class Result:
        def __init__(self, arrays: dict[str, np.ndarray]) -> None:
            self.arrays = arrays

        def as_numpy(self, name: str) -> np.ndarray | None:
            return self.arrays.get(name)

    delta = _delta("é", 3, "stop")
    assert _parse(Result(encode_router_outputs(delta))) == delta
    with pytest.raises(APIError) as err:
        _parse(Result({"num_input_tokens": np.array([1.5], np.float32)}))
    assert err.value.status == 502 and "num_input_tokens" in err.value.message
