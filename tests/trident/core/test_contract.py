"""The tensor tables: in step with the model configs, and reading/encoding by them."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

import numpy as np
import pytest

from trident.core.contract import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    SAMPLING_INPUTS,
    WORKER_INPUTS,
    WORKER_OUTPUTS,
    Contract,
    TensorSpec,
)
from trident.core.errors import ValidationError
from trident.core.router_io import RouterDelta
from trident.core.types import SamplingParams

REPOSITORY = Path(__file__).resolve().parents[3] / "model_repository"
TABLES = {
    "router": (ROUTER_INPUTS, ROUTER_OUTPUTS),
    "decode": (WORKER_INPUTS, WORKER_OUTPUTS),
    "prefill": (WORKER_INPUTS, WORKER_OUTPUTS),
}
_ENTRY = re.compile(r"\{([^{}]*)\}")


def config_tensors(model: str, section: str) -> list[str]:
    """The `input` or `output` list of a config.pbtxt, one line per tensor."""
    text = re.sub(r"#[^\n]*", "", (REPOSITORY / model / "config.pbtxt").read_text())
    start = re.search(rf"^\s*{section}\s*\[", text, re.MULTILINE)
    assert start is not None, f"{model}/config.pbtxt has no {section} list"
    depth, end = 1, start.end()
    while depth:
        depth += {"[": 1, "]": -1}.get(text[end], 0)
        end += 1
    lines = []
    for entry in _ENTRY.findall(text[start.end() : end - 1]):
        name = re.search(r'name:\s*"([^"]+)"', entry)
        dtype = re.search(r"data_type:\s*TYPE_(\w+)", entry)
        dims = re.search(r"dims:\s*\[([^\]]*)\]", entry)
        optional = re.search(r"optional:\s*(true|false)", entry)
        assert name and dtype and dims, f"{model}/config.pbtxt: cannot read {entry!r}"
        datatype = "BYTES" if dtype[1] == "STRING" else dtype[1]
        shape = tuple(int(d) for d in dims[1].replace(",", " ").split())
        lines.append(_line(name[1], datatype, shape, bool(optional and optional[1] == "true")))
    return lines


def _line(name: str, datatype: str, dims: tuple[int, ...], optional: bool) -> str:
    return f"{name} {datatype} {list(dims)}{' optional' if optional else ''}"


def table_tensors(contract: Contract) -> list[str]:
    """One line per tensor; `optional` only for inputs (a config's outputs have no such field:
    an optional output is one the model leaves out of a response when it has no value)."""
    return [_line(s.name, s.datatype, s.dims, s.optional and contract.kind == "input") for s in contract.specs]


@pytest.mark.parametrize("model", sorted(TABLES))
@pytest.mark.parametrize("section", ["input", "output"])
def test_config_matches_the_table(model: str, section: str) -> None:
    contract = TABLES[model][section == "output"]
    config, table = config_tensors(model, section), table_tensors(contract)
    if config != table:
        diff = difflib.unified_diff(
            config, table, f"model_repository/{model}/config.pbtxt",
            f"trident.core.contract {contract.owner} {section}s", lineterm="",
        )
        pytest.fail("the config and the table disagree:\n" + "\n".join(diff), pytrace=False)


def test_shared_names_travel_alike() -> None:
    """A tensor of the router and the workers is encoded alike (trident.router_client may
    look it up in either table); only its doc may differ."""
    for a, b in ((ROUTER_INPUTS, WORKER_INPUTS), (ROUTER_OUTPUTS, WORKER_OUTPUTS), (ROUTER_INPUTS, SAMPLING_INPUTS)):
        for name in set(a) & set(b):
            assert dataclasses.replace(a[name], doc="") == dataclasses.replace(b[name], doc=""), name


def test_sampling_defaults_are_sampling_params_defaults() -> None:
    defaults = SamplingParams()
    for spec in SAMPLING_INPUTS.specs:
        if spec.name.startswith("logit_bias_"):  # the two halves of SamplingParams.logit_bias
            assert spec.default == () == defaults.logit_bias, spec.name
        elif spec.name != "random_seed":
            assert spec.default == getattr(defaults, spec.name), spec.name


def test_router_outputs_are_router_delta_fields() -> None:
    assert ROUTER_OUTPUTS.names == tuple(f.name for f in dataclasses.fields(RouterDelta))


def test_every_spec_is_documented() -> None:
    for contract in (ROUTER_INPUTS, ROUTER_OUTPUTS, WORKER_INPUTS, WORKER_OUTPUTS):
        assert all(spec.doc for spec in contract.specs), contract


VALUES = {
    "text_input": "héllo",
    "input_ids": (1, 2, 3),
    "max_tokens": 7,
    "stream": True,
    "temperature": 0.5,
    "seed": 2**63 + 5,
    "stop": ("\n", "é"),
    "request_id": "",
}


def test_encode_then_read_round_trips() -> None:
    arrays = ROUTER_INPUTS.encode({**VALUES, "min_tokens": None})
    assert "min_tokens" not in arrays  # None is not sent
    assert arrays["seed"].dtype == np.uint64 and arrays["input_ids"].dtype == np.int32
    assert arrays["temperature"].dtype == np.float32 and arrays["stream"].dtype == np.bool_
    assert arrays["text_input"].dtype == np.object_ and arrays["text_input"][0] == "héllo".encode()
    assert ROUTER_INPUTS.read(arrays) == VALUES
    full = ROUTER_INPUTS.read(arrays, defaults=True)
    assert full["min_tokens"] == 0 and full["messages"] is None and set(full) == set(ROUTER_INPUTS)


def test_raw_bytes_stay_bytes() -> None:
    blob = b"\x00\xff binary"
    arrays = WORKER_OUTPUTS.encode({"kv_descriptor": blob, "output_ids": ()})
    assert arrays["output_ids"].shape == (0,)
    assert WORKER_OUTPUTS.read(arrays) == {"output_ids": (), "kv_descriptor": blob}


def test_read_ignores_undeclared_arrays_and_keeps_table_order() -> None:
    arrays = {"stream": np.array([False]), "other": np.array([1]), "text_input": np.array([b"x"], np.object_)}
    assert list(ROUTER_INPUTS.read(arrays)) == ["text_input", "stream"]


def test_a_contract_is_a_mapping_of_names() -> None:
    assert list(WORKER_OUTPUTS) == list(WORKER_OUTPUTS.names) and len(WORKER_OUTPUTS) == 12
    assert "hold_kv" in WORKER_INPUTS and "hold_kv" not in ROUTER_INPUTS
    assert WORKER_INPUTS.spec("hold_kv") is WORKER_INPUTS["hold_kv"]


@pytest.mark.parametrize(
    "name,array,message",
    [
        ("max_tokens", np.array([1.5], np.float32), "must be an integer"),
        ("max_tokens", np.array([True]), "must be an integer"),
        ("max_tokens", np.array([1, 2], np.int32), "expected a single value, got shape [2]"),
        ("temperature", np.array([np.inf], np.float32), "must be finite"),
        ("temperature", np.array([b"x"], np.object_), "must be a number"),
        ("stream", np.array([7], np.int32), "must be a boolean"),
        ("text_input", np.array([b"\xff"], np.object_), "is not valid UTF-8"),
        ("text_input", np.array([3], np.int32), "must be a string"),
        ("input_ids", np.array([1.0], np.float32), "must be integers"),
        ("stop", np.array([b"a", b"\xfe"], np.object_), "is not valid UTF-8"),
    ],
)
def test_read_errors_name_the_field(name: str, array: np.ndarray, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        ROUTER_INPUTS.read({"text_input": np.array([b"ok"], np.object_), name: array})
    assert err.value.field == name and str(err.value).startswith(f"{name}: {message}")


def test_raw_bytes_refuse_text() -> None:
    with pytest.raises(ValidationError, match="^kv_descriptor: must be bytes"):
        WORKER_INPUTS.read({"kv_descriptor": np.array(["text"], np.object_)})


def test_encode_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="^max_token: unknown input; the router's inputs are text_input"):
        ROUTER_INPUTS.encode({"max_token": 4})
    with pytest.raises(ValidationError, match="^max_tokens: cannot be sent as INT32"):
        ROUTER_INPUTS.encode({"max_tokens": "many"})
    with pytest.raises(ValidationError, match="^text_input: must be a string or bytes"):
        ROUTER_INPUTS.encode({"text_input": 3})


def test_specs_refuse_unknown_datatypes() -> None:
    with pytest.raises(ValueError, match="unsupported datatype"):
        TensorSpec("x", "TYPE_INT32")
    with pytest.raises(ValueError, match="raw applies to BYTES only"):
        TensorSpec("x", "INT32", raw=True)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("max_tokens", 2**40, "max_tokens: cannot be sent as INT32: 1099511627776 is outside [-2147483648, 2147483647]"),
        ("input_ids", [1, -(2**31) - 1], "input_ids: cannot be sent as INT32: -2147483649 is outside"),
        ("seed", -1, "seed: cannot be sent as UINT64: -1 is outside [0, 18446744073709551615]"),
        ("seed", 2**64, "seed: cannot be sent as UINT64: 18446744073709551616 is outside"),
        ("max_tokens", 1.7, "max_tokens: cannot be sent as INT32: 1.7 is not an integer"),
        ("max_tokens", True, "max_tokens: cannot be sent as INT32: True is not an integer"),
        ("temperature", float("nan"), "temperature: cannot be sent as FP32: nan is not finite"),
        ("temperature", 1e39, "temperature: cannot be sent as FP32: 1e+39 is outside the FP32 range"),
        ("temperature", 10**400, "temperature: cannot be sent as FP32: 1000000000000000000000000000000000000..."),
        ("stream", 2, "stream: cannot be sent as BOOL: 2 is not a boolean"),
        ("text_input", "\ud800", "text_input: is not valid Unicode text (lone surrogate)"),
        ("stop", ["ok", "\udfff"], "stop: is not valid Unicode text (lone surrogate)"),
    ],
)
def test_encode_refuses_values_that_would_not_arrive_intact(name: str, value: object, message: str) -> None:
    """numpy would wrap 2**40 to 0 in an INT32 (a silent max_tokens=0) or round 1.7 to 1."""
    with pytest.raises(ValidationError) as err:
        ROUTER_INPUTS.encode({name: value})
    assert err.value.field == name and str(err.value).startswith(message)


def test_encode_takes_arrays_of_its_datatype_as_they_are() -> None:
    ids = np.array([[1, 2**31 - 1]], np.int32)
    sent = ROUTER_INPUTS.encode({"input_ids": ids})["input_ids"]
    assert sent.shape == (2,) and np.shares_memory(sent, ids)  # not copied nor checked again
    assert ROUTER_INPUTS.encode({"input_ids": np.array([3, 4], np.int64)})["input_ids"].dtype == np.int32
    assert ROUTER_INPUTS.encode({"stream": 1, "temperature": 2})["temperature"].dtype == np.float32
