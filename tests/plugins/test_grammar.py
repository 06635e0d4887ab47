"""Structured outputs in the torch engine, without a server: the spec parser, the compiled
grammar cache, and the real engine on SmolLM2 generating under JSON-schema, regex and choice
constraints (outputs checked with `jsonschema`, `re`), including a migrated request whose
grammar state is replayed from its earlier outputs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.torch_engine.grammar import Grammars, vocab_from_model
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.errors import ValidationError
from trident.core.structured import parse_structured_outputs, structured_outputs_text
from trident.core.types import GenerateRequest, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "structured_outputs"),
        ("[1]", "structured_outputs"),
        ('{"regex": "a", "choice": ["b"]}', "structured_outputs"),
        ('{"jsn": {}}', "structured_outputs.jsn"),
        ('{"choice": []}', "structured_outputs.choice"),
        ('{"choice": ["a", 3]}', "structured_outputs.choice"),
        ('{"regex": ""}', "structured_outputs.regex"),
        ('{"json": "{not json"}', "structured_outputs.json"),
        ('{"json_object": 1}', "structured_outputs.json_object"),
    ],
)
def test_malformed_specs_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_structured_outputs(text)
    assert err.value.field == field


def test_sampling_params_validate_the_spec() -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(structured_outputs='{"choice": "yes"}').validate()
    assert err.value.field == "structured_outputs.choice"
    SamplingParams(structured_outputs=structured_outputs_text("regex", "a+")).validate()


def test_equal_schemas_share_one_key() -> None:
    a = parse_structured_outputs(json.dumps({"json": {"type": "object", "required": ["x"]}}))
    b = parse_structured_outputs(
        json.dumps({"json": json.dumps({"required": ["x"], "type": "object"})})
    )
    assert a.key == b.key


def test_vocab_matches_the_tokenizer(default_model_path: str) -> None:
    vocab = vocab_from_model(default_model_path)
    tok = load_tokenizer(default_model_path)
    assert len(vocab) == tok.vocab_size
    for text in ("hello", " world", '{"', "é"):
        ids = tok.encode(text)
        assert b"".join(vocab[i] for i in ids) == text.encode("utf-8")
    assert vocab[tok.eos_token_ids[0]] == b""  # special: never allowed inside a grammar


def test_grammars_are_cached_and_bad_ones_refused(default_model_path: str) -> None:
    grammars = Grammars(default_model_path, 49152, [2], capacity=2)
    spec = structured_outputs_text("json", PERSON)
    first = grammars.compile(spec)
    assert grammars.compile(spec) is first and grammars.compiles == 1
    grammars.compile(structured_outputs_text("regex", "[ab]+"))
    grammars.compile(structured_outputs_text("choice", ["x", "y"]))  # evicts PERSON (LRU of 2)
    grammars.compile(spec)
    assert grammars.compiles == 4
    for kind, value in (("regex", "(ab"), ("json", {"type": "nonsense"}), ("grammar", "root ::= ")):
        with pytest.raises(ValidationError) as err:
            grammars.compile(structured_outputs_text(kind, value))
        assert err.value.field == f"structured_outputs.{kind}"
        assert "/project/" not in err.value.message


@pytest.fixture(scope="module")
def engine(default_model_path: str) -> Iterator[TorchEngine]:
    eng = TorchEngine(
        TorchEngineConfig(
            model=default_model_path,
            dtype="float32",
            num_blocks=256,
            num_threads=2,
            worker_id="grammar",
        )
    )
    eng.start()
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def tokenizer(default_model_path: str):
    return load_tokenizer(default_model_path)


def _chat(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    )


def _run(engine: TorchEngine, request: GenerateRequest) -> tuple[list[int], str | None]:
    chunks = list(engine.generate(request, timeout=120))
    return [t for c in chunks for t in c.output_ids], chunks[-1].finish_reason


def _request(rid: str, prompt: tuple[int, ...], kind: str, value: object, **kw) -> GenerateRequest:
    sp = SamplingParams(
        max_tokens=kw.pop("max_tokens", 60),
        temperature=kw.pop("temperature", 0.0),
        structured_outputs=structured_outputs_text(kind, value),
        **kw,
    )
    return GenerateRequest(rid, prompt, sp)


def test_json_schema_output_validates(engine: TorchEngine, tokenizer) -> None:
    prompt = _chat(tokenizer, "Describe a person as JSON.")
    for i, temperature in enumerate((0.0, 1.0, 1.0)):
        ids, reason = _run(
            engine, _request(f"j{i}", prompt, "json", PERSON, temperature=temperature, seed=i)
        )
        assert reason == "stop", tokenizer.decode(ids)
        jsonschema.validate(json.loads(tokenizer.decode(ids)), PERSON)


def test_regex_and_choice_outputs_match(engine: TorchEngine, tokenizer) -> None:
    prompt = _chat(tokenizer, "Give me a phone number.")
    ids, reason = _run(
        engine, _request("re", prompt, "regex", r"\(\d{3}\) \d{3}-\d{4}", temperature=1.0, seed=3)
    )
    assert reason == "stop" and re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", tokenizer.decode(ids))
    choices = ["yes", "no", "maybe not"]
    for i in range(3):
        ids, reason = _run(
            engine,
            _request(
                f"c{i}",
                _chat(tokenizer, "Is it raining?"),
                "choice",
                choices,
                temperature=1.0,
                seed=i,
            ),
        )
        assert reason == "stop" and tokenizer.decode(ids) in choices


def test_a_grammar_ends_even_when_eos_is_ignored(engine: TorchEngine, tokenizer) -> None:
    ids, reason = _run(
        engine,
        _request("ie", _chat(tokenizer, "Pick."), "choice", ["left", "right"], ignore_eos=True),
    )
    assert reason == "stop" and tokenizer.decode(ids) in ("left", "right")


def test_a_migrated_request_replays_its_grammar_state(engine: TorchEngine, tokenizer) -> None:
    prompt = _chat(tokenizer, "Describe a person as JSON.")
    whole, _ = _run(engine, _request("m0", prompt, "json", PERSON))
    k = 5
    sp = SamplingParams(
        max_tokens=60 - k,
        temperature=0.0,
        structured_outputs=structured_outputs_text("json", PERSON),
    )
    rest, reason = _run(
        engine, GenerateRequest("m1", prompt + tuple(whole[:k]), sp, output_offset=k)
    )
    assert reason == "stop" and whole[:k] + rest == whole
    # Earlier outputs the grammar refuses end the request with an error, not a wrong answer.
    bad = tuple(tokenizer.encode("nope"))
    sp = SamplingParams(
        max_tokens=10, temperature=0.0, structured_outputs=structured_outputs_text("json", PERSON)
    )
    _, reason = _run(engine, GenerateRequest("m2", prompt + bad, sp, output_offset=len(bad)))
    assert reason == "error"


def test_an_invalid_schema_is_refused_at_submit(engine: TorchEngine) -> None:
    sp = SamplingParams(structured_outputs=structured_outputs_text("regex", "[a-"))
    with pytest.raises(ValidationError) as err:
        engine.submit(GenerateRequest("bad", (1, 2, 3), sp), lambda chunk: None)
    assert err.value.field == "structured_outputs.regex"


def test_min_tokens_with_a_grammar_is_refused(engine: TorchEngine) -> None:
    # The sampler bans EOS before min_tokens; a completed grammar allows only EOS.
    sp = SamplingParams(min_tokens=2, structured_outputs=structured_outputs_text("choice", ["a"]))
    with pytest.raises(ValidationError) as err:
        engine.submit(GenerateRequest("mt", (1, 2, 3), sp), lambda chunk: None)
    assert err.value.field == "min_tokens"
