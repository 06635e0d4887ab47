"""SSE framing and the JSON shapes of chunks, whole responses and usage."""

from __future__ import annotations

import json

from frontend.metrics import FrontendMetrics
from frontend.protocol import RouterRequest
from frontend.serving import SSE_DONE, Generation, ResponseShape, sse
from frontend.triton_client import RouterDelta, model_id_from_parameters, model_id_from_path


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
    requests = [RouterRequest(request_id=f"r-{i}", text_input="x", stream=True) for i in range(2)]
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
        None, [RouterRequest(request_id="r", text_input="x", stream=False)], {}, metrics, "m", n=1
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
