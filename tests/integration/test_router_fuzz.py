"""Fuzzing the router's and the workers' input tensors on the real tritonserver (Hypothesis).

Every generated case is one request on a fresh gRPC stream. It must end within
`CASE_TIMEOUT_S` either with a final response whose outputs parse by `ROUTER_OUTPUTS` /
`WORKER_OUTPUTS`, or with a Triton error whose text names the input that was fuzzed (or
`prompt`, the name context-length errors use for a prompt input). After each run the
router and both decode workers still serve a plain request: no case killed a stub.

The cases: one input at a time with any Triton datatype and shape and any values (NaN,
inf, extremes, bytes that are not UTF-8), malformed `messages` JSON, unknown input names
and request parameters, and well-typed requests mixing every sampling input. Valid
`max_tokens` stay at 1-4 (invalid ones are anything else) so that no case generates long.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.fuzz_settings import CASE_TIMEOUT_S, FUZZ, VOCAB_SIZE
from tests.integration.server_fixture import ServerInfo
from trident.core.contract import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    WORKER_INPUTS,
    WORKER_OUTPUTS,
    Contract,
)

DATATYPES = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
SHAPES = [(1,), (0,), (2,), (3,), (1, 1)]
PROMPT_INPUTS = ("text_input", "messages", "input_ids")
BIG_TEXT = [b"hello " * 20_000, "\u00e9".encode() * 30_000]
TRICKY_FLOATS = [
    float(np.float32(x)) for x in (1e-45, 1e-38, 1e-30, 3.4e38, -0.0, np.nan, np.inf, -np.inf)
]

Tensor = tuple[str, np.ndarray, str]  # name, values, Triton datatype


# ---- talking to the server -----------------------------------------------------------
class Outcome:
    """How one request ended: `responses` (outputs by name) or a Triton `error` text."""

    def __init__(
        self, responses: list[dict[str, np.ndarray]] | None = None, error: str | None = None
    ) -> None:
        self.responses = responses
        self.error = error


def call(
    client: grpcclient.InferenceServerClient,
    model: str,
    tensors: list[Tensor],
    parameters: dict[str, Any] | None = None,
) -> Outcome:
    """One request on its own stream; fails the test if no final response comes in time."""
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put(error if error is not None else result)
    )
    finished = False
    try:
        inputs = []
        for name, array, datatype in tensors:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer(
            model,
            inputs,
            request_id="fuzz",
            parameters=parameters,
            enable_empty_final_response=True,
        )
        responses = []
        while True:
            try:
                item = results.get(timeout=CASE_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(
                    f"{model}: no final response within {CASE_TIMEOUT_S:.0f}s for {_show(tensors)}"
                )
            if isinstance(item, Exception):
                finished = True
                return Outcome(error=item.message() if hasattr(item, "message") else str(item))
            response = item.get_response()
            if response.outputs:
                responses.append({o.name: item.as_numpy(o.name) for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                finished = True
                return Outcome(responses=responses)
    finally:
        # Cancel only an unfinished request: tritonserver 2.51 can keep a reference to the
        # model when a stream is cancelled right after its last response.
        client.stop_stream(cancel_requests=not finished)


def _show(tensors: list[Tensor]) -> str:
    return ", ".join(
        f"{n}:{d}{list(a.shape)}={np.array2string(a.reshape(-1)[:4], threshold=4)[:80]}"
        for n, a, d in tensors
    )


def check(
    outcome: Outcome, outputs: Contract, fields: tuple[str, ...], tensors: list[Tensor]
) -> None:
    """A final answer whose outputs parse, or an error that names one of `fields`."""
    event("refused" if outcome.error is not None else "answered")  # --hypothesis-show-statistics
    if outcome.error is not None:
        text = outcome.error.replace(" ", "_")  # "kv descriptor: ..." names kv_descriptor
        named = set(fields) | ({"prompt"} if set(fields) & set(PROMPT_INPUTS) else set())
        assert any(name.replace(" ", "_") in text for name in named), (
            f"the error does not name {sorted(named)}: {outcome.error!r} for {_show(tensors)}"
        )
        return
    assert outcome.responses is not None
    for arrays in outcome.responses:
        outputs.read(arrays)  # raises ValidationError naming a malformed output
    if outputs is ROUTER_OUTPUTS:
        assert outcome.responses and outcome.responses[-1]["finish_reason"][0] in (
            b"stop",
            b"length",
        ), f"no finish_reason on the last response for {_show(tensors)}"


def assert_serves(server: ServerInfo) -> None:
    """The router and both decode workers answer a plain request (no stub died)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        text = [
            ("text_input", np.array([b"The capital of France is"], np.object_), "BYTES"),
            _max_tokens(2),
        ]
        answer = call(client, "router", text)
        assert answer.error is None and answer.responses, answer.error
        for worker in server.decode_models:
            ids = [("input_ids", np.array([1, 2, 3], np.int32), "INT32"), _max_tokens(2)]
            assert call(client, worker, ids).error is None, worker
    finally:
        client.close()


@pytest.fixture(scope="module")
def client(triton_server: ServerInfo) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        yield c
    finally:
        c.close()


# ---- strategies ----------------------------------------------------------------------
def _max_tokens(n: int) -> Tensor:
    return ("max_tokens", np.array([n], np.int32), "INT32")


# Valid budgets stay tiny (a case must not generate for long); the rest are all invalid.
BUDGETS = st.one_of(st.integers(1, 4), st.integers(-(2**31), 0), st.integers(8190, 2**31 - 1))
BYTES_VALUES = st.one_of(
    st.binary(max_size=24), st.text(max_size=24).map(str.encode), st.sampled_from(BIG_TEXT)
)
SURROGATE_TEXT = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | SURROGATE_TEXT,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
TEXT_PART = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["text", "image_url"]) | JSON_VALUES,
        "text": st.text(max_size=30) | JSON_VALUES,
    }
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", ""])
        | JSON_VALUES
    },
    optional={
        "content": st.text(max_size=40)
        | SURROGATE_TEXT
        | st.lists(TEXT_PART, max_size=2)
        | JSON_VALUES,
        "name": JSON_VALUES,
        "tool_calls": JSON_VALUES,
    },
)


@st.composite
def messages_json(draw: st.DrawFn) -> bytes:
    """Chat JSON as a client might get it wrong: odd values, then maybe mangled bytes."""
    value: Any = draw(st.lists(MESSAGE, max_size=3) | JSON_VALUES)
    if draw(st.booleans()):
        value = {"messages": value}
    raw = json.dumps(value).encode()  # NaN and Infinity stay, as Python's json writes them
    mangle = draw(st.sampled_from(["none", "truncate", "insert", "nest", "junk"]))
    if mangle == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mangle == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif mangle == "nest":
        depth = draw(st.sampled_from([70, 3000]))  # 3000 exhausts json's stack
        raw = b"[" * depth + raw + b"]" * depth
    elif mangle == "junk":
        raw = draw(st.binary(max_size=40))
    return raw


def elements(name: str, datatype: str) -> st.SearchStrategy[Any] | None:
    """Values for tensor `name` sent as `datatype` (None: anything of the dtype)."""
    if datatype == "BYTES":
        return messages_json() if name == "messages" else BYTES_VALUES
    if name in ("max_tokens", "min_tokens") and datatype == "INT32":
        return BUDGETS
    if name == "hold_kv" and datatype == "BOOL":
        return st.just(False)  # a held prompt pins KV blocks until its lease expires
    if datatype == "FP32":  # NaN, inf, and the values that break arithmetic downstream
        return st.floats(width=32) | st.sampled_from(TRICKY_FLOATS)
    return None


@st.composite
def tensor(
    draw: st.DrawFn, name: str, datatype: str | None = None, shape: tuple[int, ...] | None = None
) -> Tensor:
    datatype = datatype or draw(st.sampled_from(list(DATATYPES)))
    shape = shape or draw(st.sampled_from(SHAPES))
    dtype = np.dtype(DATATYPES[datatype])
    values = elements(name, datatype)
    if values is None and datatype != "BYTES":
        values = hnp.from_dtype(dtype)  # NaN, inf and the extremes included
    array = draw(hnp.arrays(dtype, shape, elements=values))
    return name, array, datatype


@st.composite
def any_input(draw: st.DrawFn, contract: Contract) -> Tensor:
    """One of `contract`'s inputs, as often with its own datatype and shape as not."""
    name = draw(st.sampled_from(contract.names))
    spec = contract[name]
    datatype = draw(st.just(spec.datatype) | st.sampled_from(list(DATATYPES)))
    valid_shapes = [(1,)] if spec.scalar else [(1,), (2,), (5,)]
    return draw(
        tensor(name, datatype, draw(st.sampled_from(valid_shapes) | st.sampled_from(SHAPES)))
    )


def _fp32(name: str, value: float) -> Tensor:
    return name, np.array([value], np.float32), "FP32"


def _bytes(name: str, value: bytes) -> Tensor:
    return name, np.array([value], np.object_), "BYTES"


def base_request(contract: Contract) -> list[Tensor]:
    if contract is ROUTER_INPUTS:
        return [("text_input", np.array([b"Hi"], np.object_), "BYTES"), _max_tokens(2)]
    return [("input_ids", np.array([1, 2, 3], np.int32), "INT32"), _max_tokens(2)]


def with_tensor(base: list[Tensor], fuzzed: Tensor) -> list[Tensor]:
    """`base` with `fuzzed` added; a fuzzed prompt input replaces the base's prompt."""
    name = fuzzed[0]
    drop = {name} | (set(PROMPT_INPUTS) if name in PROMPT_INPUTS else set())
    return [t for t in base if t[0] not in drop] + [fuzzed]


# ---- the router ----------------------------------------------------------------------
def test_router_survives_any_single_input(triton_server: ServerInfo, client: Any) -> None:
    @settings(FUZZ, max_examples=200)
    @given(fuzzed=any_input(ROUTER_INPUTS))
    # What this fuzzing found once, kept: an internal error, an overflow to NaN in the engine.
    @example(fuzzed=_fp32("temperature", 1e-45))
    @example(fuzzed=_bytes("messages", b"[" * 3000))
    @example(fuzzed=_bytes("messages", b'[{"role": "user", "content": "\\ud800"}]'))
    def run(fuzzed: Tensor) -> None:
        tensors = with_tensor(base_request(ROUTER_INPUTS), fuzzed)
        check(call(client, "router", tensors), ROUTER_OUTPUTS, (fuzzed[0],), tensors)

    run()
    assert_serves(triton_server)


def test_router_survives_malformed_messages(triton_server: ServerInfo, client: Any) -> None:
    @settings(FUZZ, max_examples=100)
    @given(raw=messages_json())
    def run(raw: bytes) -> None:
        tensors = [("messages", np.array([raw], np.object_), "BYTES"), _max_tokens(1)]
        check(call(client, "router", tensors), ROUTER_OUTPUTS, ("messages",), tensors)

    run()
    assert_serves(triton_server)


@st.composite
def sampling_tensors(draw: st.DrawFn) -> list[Tensor]:
    """A well-typed prompt and several sampling inputs at once, any values of their types."""
    prompt = draw(st.sampled_from(PROMPT_INPUTS))
    spec = ROUTER_INPUTS[prompt]
    shape = (draw(st.integers(1, 6)),) if spec.dims == (-1,) else (1,)
    tensors = [draw(tensor(prompt, spec.datatype, shape))]
    names = draw(st.lists(st.sampled_from(ROUTER_INPUTS.names[3:]), unique=True, max_size=6))
    for name in names:
        spec = ROUTER_INPUTS[name]
        shape = (draw(st.integers(0, 3)),) if spec.dims == (-1,) else (1,)
        tensors.append(draw(tensor(name, spec.datatype, shape)))
    if "max_tokens" not in names:
        tensors.append(_max_tokens(2))
    return tensors


def test_router_survives_mixed_sampling_inputs(triton_server: ServerInfo, client: Any) -> None:
    @settings(FUZZ, max_examples=150)
    @given(tensors=sampling_tensors())
    def run(tensors: list[Tensor]) -> None:
        check(
            call(client, "router", tensors),
            ROUTER_OUTPUTS,
            tuple(n for n, _, _ in tensors),
            tensors,
        )

    run()
    assert_serves(triton_server)


NAMES = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=16)


def test_router_refuses_unknown_inputs_and_parameters(
    triton_server: ServerInfo, client: Any
) -> None:
    @settings(FUZZ, max_examples=40)
    @given(
        name=NAMES | st.sampled_from(ROUTER_INPUTS.names),
        as_parameter=st.booleans(),
        value=st.integers(0, 9) | st.booleans() | st.text(max_size=8),
    )
    @example(name="max_tokens", as_parameter=True, value=5)  # was ignored without a word
    def run(name: str, as_parameter: bool, value: Any) -> None:
        base = base_request(ROUTER_INPUTS)
        if as_parameter:  # Triton reserves triton_*; every other parameter must be refused
            name = name if not name.startswith("triton_") else "x" + name
            outcome = call(client, "router", base, parameters={name: value})
        else:
            name = name if name and name not in ROUTER_INPUTS else name + "_x"
            outcome = call(client, "router", base + [(name, np.array([1], np.int32), "INT32")])
        assert outcome.error is not None and name in outcome.error, (name, outcome.error)

    run()
    assert_serves(triton_server)


# ---- the workers ---------------------------------------------------------------------
def test_workers_survive_any_single_input(triton_server: ServerInfo, client: Any) -> None:
    @settings(FUZZ, max_examples=100)
    @given(model=st.sampled_from(triton_server.decode_models), fuzzed=any_input(WORKER_INPUTS))
    @example(model="decode", fuzzed=_fp32("temperature", 1e-38))
    def run(model: str, fuzzed: Tensor) -> None:
        tensors = with_tensor(base_request(WORKER_INPUTS), fuzzed)
        check(call(client, model, tensors), WORKER_OUTPUTS, (fuzzed[0],), tensors)

    run()
    assert_serves(triton_server)


# ---- stop ids with min_tokens: once failed the whole batch's step ----------------------
@pytest.mark.parametrize(
    "stop_ids", [[VOCAB_SIZE + 5], list(range(VOCAB_SIZE))], ids=["outside", "whole-vocab"]
)
def test_stop_token_ids_outside_the_vocabulary_with_min_tokens(
    client: Any, stop_ids: list[int]
) -> None:
    tensors = [
        ("text_input", np.array([b"Hi"], np.object_), "BYTES"),
        _max_tokens(2),
        ("min_tokens", np.array([1], np.int32), "INT32"),
        ("stop_token_ids", np.array(stop_ids, np.int32), "INT32"),
    ]
    outcome = call(client, "router", tensors)
    assert outcome.error is None or "stop_token_ids" in outcome.error, outcome.error
