"""The tensor contracts of Trident's Triton models, declared once.

Each model's inputs and its outputs are a `Contract`: an ordered table of `TensorSpec`s
(name, Triton datatype, dims, optional, default, doc). These four tables are the only place
the tensors are listed; everything else derives from them:

- `model_repository/{router,decode,prefill}/config.pbtxt` must match them
  (`tests/trident/core/test_contract.py` diffs each config against its table);
- `trident.core.router_io` and `trident.core.worker_io` parse and encode with them, on the
  model side and the caller side alike;
- the clients (`frontend.triton_client`, `trident.router_client`) take each input's
  datatype and each output's type from them.

`Contract.read` turns the numpy arrays of a request or response into typed Python values
(int, finite float, bool, UTF-8 text, raw bytes, or tuples of those for dims [-1]) and raises
`ValidationError(field, ...)` naming the bad tensor; `Contract.encode` does the reverse,
refusing (with the same error) a value that would not arrive intact: an integer outside
the datatype's range, a float beyond FP32's, text with a lone surrogate.
Whether a well-typed value makes sense (max_tokens > 0, ...) is for the parsers to judge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trident.core.errors import ValidationError

Arrays = Mapping[str, np.ndarray]

_NUMPY = {
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "BOOL": np.bool_,
    "BYTES": np.object_,  # config.pbtxt's TYPE_STRING
}
_INTEGERS = frozenset({"INT32", "INT64", "UINT64"})
_INT_RANGES = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1), "UINT64": (0, 2**64 - 1)}
_FP32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor of a model.

    `datatype` is Triton's name (what tritonclient's `InferInput` takes; TYPE_STRING in a
    config is "BYTES"). dims (1,) is one value; (-1,) is a list. `raw` BYTES stay bytes
    instead of being decoded as UTF-8 text. `default` is what an absent tensor means.
    """

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)
    optional: bool = True
    default: Any = None
    doc: str = ""
    raw: bool = False

    def __post_init__(self) -> None:
        if self.datatype not in _NUMPY:
            raise ValueError(f"{self.name}: unsupported datatype {self.datatype!r}")
        if self.raw and self.datatype != "BYTES":
            raise ValueError(f"{self.name}: raw applies to BYTES only")

    @property
    def scalar(self) -> bool:
        return self.dims == (1,)

    @property
    def numpy_dtype(self) -> Any:
        return _NUMPY[self.datatype]

    def read(self, array: np.ndarray) -> Any:
        """The typed value of this tensor; `ValidationError` naming it when it does not fit."""
        values = np.asarray(array).reshape(-1)
        if self.scalar:
            if values.size != 1:
                shape = list(np.asarray(array).shape)
                raise ValidationError(self.name, f"expected a single value, got shape {shape}")
            return self._item(values[0])
        if self.datatype in _INTEGERS:
            if values.size and not np.issubdtype(values.dtype, np.integer):
                raise ValidationError(self.name, f"must be integers, got dtype {values.dtype}")
            return tuple(values.tolist())  # Python ints (token ids: the hot path)
        return tuple(self._item(v) for v in values)

    def encode(self, value: Any) -> np.ndarray:
        """`value` (one value, or a list/tuple/array of them) as a 1-D array of this datatype.

        Each value must fit the datatype as it is: numpy would wrap 2**40 to 0 in an INT32
        or round 1.7 to 1, so those raise `ValidationError` instead. An array already of
        this datatype is sent as it is. Shapes are not checked here: the server refuses a
        tensor that does not fit `dims`.
        """
        if isinstance(value, np.ndarray):
            if value.dtype == self.numpy_dtype and self.datatype != "BYTES":
                return value.reshape(-1)
            items: list[Any] = list(value.reshape(-1))
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        if self.datatype == "BYTES":
            return np.array([self._bytes_of(v) for v in items], dtype=np.object_).reshape(-1)
        problem = self._unfit(items)
        if problem:
            raise ValidationError(self.name, f"cannot be sent as {self.datatype}: {problem}")
        return np.array(items, dtype=self.numpy_dtype).reshape(-1)

    def _unfit(self, items: list[Any]) -> str | None:
        """Why `items` cannot be stored exactly in this (numeric or BOOL) datatype, or None."""
        if self.datatype in _INTEGERS:
            for v in items:
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                    return f"{_short(v)} is not an integer"
            low, high = _INT_RANGES[self.datatype]
            outside = [v for v in (min(items, default=0), max(items, default=0)) if not low <= v <= high]
            return f"{_short(outside[0])} is outside [{low}, {high}]" if outside else None
        if self.datatype == "FP32":
            for v in items:
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                    return f"{_short(v)} is not a number"
                if isinstance(v, (float, np.floating)) and not math.isfinite(v):
                    return f"{_short(v)} is not finite"
                if abs(v) > _FP32_MAX:
                    return f"{_short(v)} is outside the FP32 range"
            return None
        for v in items:  # BOOL
            if not isinstance(v, (bool, np.bool_)) and not (isinstance(v, (int, np.integer)) and v in (0, 1)):
                return f"{_short(v)} is not a boolean"
        return None

    def _item(self, value: Any) -> Any:
        name = self.name
        if self.datatype in _INTEGERS:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValidationError(name, f"must be an integer, got {value!r}")
            return int(value)
        if self.datatype == "FP32":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                raise ValidationError(name, f"must be a number, got {value!r}")
            number = float(value)
            if not math.isfinite(number):
                raise ValidationError(name, f"must be finite, got {number!r}")
            return number
        if self.datatype == "BOOL":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
                return bool(value)
            raise ValidationError(name, f"must be a boolean, got {value!r}")
        if self.raw:
            if isinstance(value, (bytes, np.bytes_)):
                return bytes(value)
            raise ValidationError(name, f"must be bytes, got {type(value).__name__}")
        if isinstance(value, (bytes, np.bytes_)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError(name, "is not valid UTF-8") from None
        if isinstance(value, str):
            return value
        raise ValidationError(name, f"must be a string, got {type(value).__name__}")

    def _bytes_of(self, value: Any) -> bytes:
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON's "\ud800"
                raise ValidationError(self.name, "is not valid Unicode text (lone surrogate)") from None
        if isinstance(value, (bytes, np.bytes_)):
            return bytes(value)
        raise ValidationError(self.name, f"must be a string or bytes, got {type(value).__name__}")


def _short(value: Any) -> str:
    """`repr(value)` cut to a length an error message can carry."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 40 else text[:37] + "..."


class Contract(Mapping[str, TensorSpec]):
    """The ordered inputs (or outputs) of one model: a read-only mapping name -> `TensorSpec`.

    Iterating yields the names in config order, so a Contract goes wherever a list of
    tensor names is expected; `.names` is that list as a tuple.
    """

    __slots__ = ("owner", "kind", "specs", "_by_name")

    def __init__(self, owner: str, kind: str, specs: Iterable[TensorSpec]) -> None:
        self.owner = owner  # "router", "worker": for error messages
        self.kind = kind  # "input" or "output"
        self.specs = tuple(specs)
        self._by_name = {spec.name: spec for spec in self.specs}
        if len(self._by_name) != len(self.specs):
            raise ValueError(f"{owner} {kind}s: duplicate names")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def spec(self, name: str) -> TensorSpec:
        """The spec of `name`; `ValidationError` naming it when this contract has none."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name)
            raise ValidationError(name, f"unknown {self.kind}; the {self.owner}'s {self.kind}s are {known}") from None

    def encode(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Arrays of the values given; None values are left out, unknown names refused."""
        return {name: self.spec(name).encode(value) for name, value in values.items() if value is not None}

    def encode_response(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays of one response: every value given, except `optional` outputs equal to
        their default (the logprob outputs of a request without logprobs stay off the wire;
        `read(..., defaults=True)` restores them)."""
        return self.encode({
            name: value for name, value in values.items()
            if not (self.spec(name).optional and value == self.spec(name).default)
        })

    def read(self, arrays: Arrays, *, defaults: bool = False) -> dict[str, Any]:
        """Typed values of the tensors present in `arrays`, in table order.

        With `defaults`, every absent tensor maps to its spec's default (None included), so
        the result has every name. Arrays this contract does not declare are ignored (the
        server refuses unknown inputs; `router_io.check_parameters` catches the rest).
        """
        out: dict[str, Any] = {}
        for spec in self.specs:
            if spec.name in arrays:
                out[spec.name] = spec.read(arrays[spec.name])
            elif defaults:
                out[spec.name] = spec.default
        return out

    def __getitem__(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"Contract({self.owner!r}, {self.kind!r}, {list(self._by_name)})"


# ---- sampling: the same inputs on the router and the workers ------------------------------
# Defaults are SamplingParams' (trident.core.types; test_contract.py checks that they agree).
MAX_TOKENS = TensorSpec("max_tokens", "INT32", default=16, doc="most tokens to generate")
MIN_TOKENS = TensorSpec("min_tokens", "INT32", default=0, doc="tokens before EOS or a stop id may end it")
TEMPERATURE = TensorSpec("temperature", "FP32", default=1.0, doc="0 is greedy")
TOP_P = TensorSpec("top_p", "FP32", default=1.0, doc="nucleus sampling mass, in (0, 1]")
TOP_K = TensorSpec("top_k", "INT32", default=0, doc="sample among the k likeliest; 0 disables")
SEED = TensorSpec("seed", "UINT64", doc="per-request seed: reproducible whatever the batch")
RANDOM_SEED = TensorSpec("random_seed", "UINT64", doc="TensorRT-LLM's name for seed (router only; seed wins)")
STOP_TOKEN_IDS = TensorSpec("stop_token_ids", "INT32", (-1,), default=(), doc="token ids that end the generation")
IGNORE_EOS = TensorSpec("ignore_eos", "BOOL", default=False, doc="keep generating past EOS")
PRESENCE_PENALTY = TensorSpec("presence_penalty", "FP32", default=0.0,
                              doc="OpenAI: subtracted from the logit of every token already output, in [-2, 2]")
FREQUENCY_PENALTY = TensorSpec("frequency_penalty", "FP32", default=0.0,
                               doc="OpenAI: times each token's count in the output, subtracted, in [-2, 2]")
REPETITION_PENALTY = TensorSpec("repetition_penalty", "FP32", default=1.0,
                                doc="HF/vLLM: logits of prompt and output tokens divided (> 0) or multiplied (< 0) by it")
MIN_P = TensorSpec("min_p", "FP32", default=0.0, doc="drop tokens below min_p times the likeliest's probability")
LOGIT_BIAS_IDS = TensorSpec("logit_bias_ids", "INT32", (-1,), default=(), doc="token ids whose logits get a bias")
LOGIT_BIAS_VALUES = TensorSpec("logit_bias_values", "FP32", (-1,), default=(),
                               doc="the bias of each logit_bias_ids token, in [-100, 100]")
LOGPROBS = TensorSpec("logprobs", "INT32",
                      doc="return each output token's logprob and this many top alternatives (0..20)")
PROMPT_LOGPROBS = TensorSpec("prompt_logprobs", "INT32",
                             doc="return the logprob of every prompt token after the first, and this many top ones")
STRUCTURED_OUTPUTS = TensorSpec(
    "structured_outputs", "BYTES",
    doc='constrained decoding, JSON with one key: {"json": schema} | {"json_object": true} | {"regex": str} '
        '| {"choice": [str, ...]} | {"grammar": EBNF str} (vLLM\'s StructuredOutputsParams)',
)

# The logits-processing, logprob and structured-output inputs, in config order (the router
# and the workers list them after their own inputs).
LOGITS_INPUTS = (
    PRESENCE_PENALTY, FREQUENCY_PENALTY, REPETITION_PENALTY, MIN_P, LOGIT_BIAS_IDS, LOGIT_BIAS_VALUES,
    LOGPROBS, PROMPT_LOGPROBS, STRUCTURED_OUTPUTS,
)

SAMPLING_INPUTS = Contract(
    "sampling",
    "input",
    (MAX_TOKENS, MIN_TOKENS, TEMPERATURE, TOP_P, TOP_K, SEED, RANDOM_SEED, STOP_TOKEN_IDS, IGNORE_EOS,
     *LOGITS_INPUTS),
)
# The logprob outputs of the router and the workers: k alternatives per position, flattened.
LOGPROB_OUTPUTS = (
    ("output_logprobs", "FP32", "logprob of each output_ids token (with the logprobs input, else empty)"),
    ("top_logprob_ids", "INT32", "the top alternatives of each output token, k per token, likeliest first"),
    ("top_logprobs", "FP32", "their logprobs, aligned with top_logprob_ids"),
    ("prompt_token_logprobs", "FP32", "first response, with prompt_logprobs: logprob of prompt tokens 1.."),
    ("prompt_top_logprob_ids", "INT32", "the top alternatives of each of those prompt tokens, k per token"),
    ("prompt_top_logprobs", "FP32", "their logprobs, aligned with prompt_top_logprob_ids"),
)


def _output(
    name: str, datatype: str, default: Any, doc: str, dims: tuple[int, ...] = (1,), raw: bool = False,
    optional: bool = False,
) -> TensorSpec:
    """An output spec. `optional` outputs are sent only when they differ from their default
    (`Contract.encode_response`); readers take the default for an absent one."""
    return TensorSpec(name, datatype, dims, optional=optional, default=default, doc=doc, raw=raw)


# ---- the router model (model_repository/router/config.pbtxt) ------------------------------
# Every input is optional, but exactly one of text_input / messages / input_ids is required.
ROUTER_INPUTS = Contract("router", "input", (
    TensorSpec("text_input", "BYTES", doc="the prompt as text (tokenized with special tokens)"),
    TensorSpec("messages", "BYTES", doc='chat JSON [{"role", "content"}, ...], for the chat template'),
    TensorSpec("input_ids", "INT32", (-1,), doc="the prompt as token ids"),
    MAX_TOKENS,
    MIN_TOKENS,
    TensorSpec("stream", "BOOL", default=False, doc="one response per text delta, else one in all"),
    TEMPERATURE,
    TOP_P,
    TOP_K,
    SEED,
    RANDOM_SEED,
    TensorSpec("stop", "BYTES", (-1,), default=(), doc="stop strings (empty ones ignored), not output"),
    STOP_TOKEN_IDS,
    IGNORE_EOS,
    TensorSpec("exclude_input_in_output", "BOOL", default=False,
               doc="accepted for TensorRT-LLM clients: the output never includes the input"),
    TensorSpec("request_id", "BYTES", default="", doc="the client's id for the request, for logs"),
    TensorSpec("probe", "BOOL", default=False,
               doc="a liveness probe: answered at once with one final response whose text_output is the "
                   "router instance's id (other inputs ignored)"),
    *LOGITS_INPUTS,
    TensorSpec("tools", "BYTES",
               doc='with messages: OpenAI tools JSON [{"type": "function", "function": {...}}], '
                   'passed to the chat template as `tools`'),
))
PROMPT_INPUTS = ("text_input", "messages", "input_ids")

# Every response carries every output but the optional ones, sent when they have values;
# the names are RouterDelta's fields.
ROUTER_OUTPUTS = Contract("router", "output", (
    _output("text_output", "BYTES", "", "text new since the previous response (all if not streaming)"),
    _output("output_ids", "INT32", (), "token ids new since the previous response", dims=(-1,)),
    _output("finish_reason", "BYTES", "", 'stop | length | abort | error on the last response, "" before'),
    _output("num_input_tokens", "INT32", 0, "prompt tokens"),
    _output("num_output_tokens", "INT32", 0, "tokens generated so far (cumulative)"),
    _output("cached_tokens", "INT32", 0, "prompt tokens found in the worker's prefix cache"),
    _output("worker", "BYTES", "", 'the worker model that served it ("prefill>decode" if disaggregated)'),
    *(_output(name, dtype, (), doc, dims=(-1,), optional=True) for name, dtype, doc in LOGPROB_OUTPUTS),
    _output("prompt_ids", "INT32", (), "first response, with prompt_logprobs: the prompt's token ids", dims=(-1,), optional=True),
    _output("output_tokens", "BYTES", (), "with logprobs: the text of each output_ids token alone", dims=(-1,), optional=True),
    _output("top_logprob_tokens", "BYTES", (), "the text of each top_logprob_ids token", dims=(-1,), optional=True),
    _output("prompt_tokens", "BYTES", (), "with prompt_ids: the text of each prompt token alone", dims=(-1,), optional=True),
    _output("prompt_top_logprob_tokens", "BYTES", (), "the text of each prompt_top_logprob_ids token", dims=(-1,), optional=True),
))

# ---- the worker models (model_repository/{decode,prefill}/config.pbtxt) -------------------
# All optional; a generation needs input_ids. Disaggregation (router_ensemble/orchestration/
# disagg.py) sends hold_kv to a prefill worker, then kv_descriptor + first_token to a decode one.
WORKER_INPUTS = Contract("worker", "input", (
    TensorSpec("input_ids", "INT32", (-1,), doc="the prompt's token ids (required to generate)"),
    TensorSpec("request_id", "BYTES", default="", doc="the router's id for the request (else Triton's)"),
    MAX_TOKENS,
    MIN_TOKENS,
    TEMPERATURE,
    TOP_P,
    TOP_K,
    SEED,
    STOP_TOKEN_IDS,
    IGNORE_EOS,
    TensorSpec("abort_request_id", "BYTES", doc="abort that request instead (one empty final response answers)"),
    TensorSpec("hold_kv", "BOOL", default=False,
               doc="prefill: keep the prompt's KV under a lease and return its descriptor"),
    TensorSpec("kv_descriptor", "BYTES", raw=True,
               doc="decode: pull the prompt's KV from the prefill worker it describes"),
    TensorSpec("first_token", "INT32",
               doc="decode, with kv_descriptor: the token prefill sampled (not sent again; max_tokens counts it)"),
    TensorSpec("output_offset", "INT32", default=0,
               doc="a migrated request: its last N prompt tokens are outputs already generated (seeded sampling continues)"),
    *LOGITS_INPUTS,
))

# Every response carries every output but the optional ones, sent when they have values.
WORKER_OUTPUTS = Contract("worker", "output", (
    _output("output_ids", "INT32", (), "token ids of this response", dims=(-1,)),
    _output("finish_reason", "BYTES", "", 'stop | length | abort | error on the last response, "" before'),
    _output("num_input_tokens", "INT32", 0, "prompt tokens"),
    _output("num_output_tokens", "INT32", 0, "tokens in this response"),
    _output("cached_tokens", "INT32", 0, "prompt tokens found in the prefix cache"),
    _output("kv_descriptor", "BYTES", b"", 'the leased blocks, on the last response of a hold_kv request, else b""',
            raw=True),
    *(_output(name, dtype, (), doc, dims=(-1,), optional=True) for name, dtype, doc in LOGPROB_OUTPUTS),
))
