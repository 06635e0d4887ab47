"""The tokenizer must agree with Hugging Face transformers token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router_ensemble.text.tokenizer import export_hf_tokenizer, load_tokenizer
from trident.core.errors import ValidationError

TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs and trailing   ",
    "日本語のテキストと中文字符",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "numbers 1234567 3.14159 -42 1e-9",
    "Ünïcödé çà va? ñ ß Æ",
    "",
    "don't I'll we've THEY'RE",
    "a\r\nb\u00a0c\u200bd",
    "مرحبا بالعالم — Привет, мир!",
    '<repo_name>x<file_sep>{"k": [1, 2]}',
]


@pytest.fixture(scope="module")
def tok(default_model_path):
    return load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def hf_tok(default_model_path):
    from transformers import AutoTokenizer

    directory, name = os.path.split(default_model_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def test_encode_and_decode_match_transformers(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(
            text, add_special_tokens=True
        ), text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(
            ids, skip_special_tokens=False
        ), text


def test_properties(tok, hf_tok):
    assert tok.eos_token_ids == (2,)
    assert tok.bos_token_id == 1
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert tok.decode([2], skip_special_tokens=False) == "<|im_end|>"


def test_chat_template_matches_transformers(tok, hf_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
        },
    ]
    as_strings = messages[:3] + [{"role": "user", "content": "part one\npart two"}]
    for gen in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert ours == hf_tok.apply_chat_template(
            as_strings, tokenize=False, add_generation_prompt=gen
        )
    # no system message: the template inserts SmolLM's default one
    text = tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"content": "no role"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        ["not a dict"],
    ],
)
def test_invalid_messages_name_the_field(tok, messages):
    with pytest.raises(ValidationError) as info:
        tok.apply_chat_template(messages)
    assert info.value.field == "messages"


def test_raise_exception_in_template_is_a_validation_error(tok):
    from router_ensemble.text.tokenizer import Tokenizer

    strict = Tokenizer(
        tok.backend,
        model_id="strict",
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok",
        special_tokens={},
        eos_token_ids=(2,),
        bos_token_id=None,
    )
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValidationError, match="first message must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_detokenization_is_complete_and_clean(tok, step):
    text = "日本語 🙂👍🏽 👨‍👩‍👧 中文 ok\nÜber 🇫🇷!<|im_end|>"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    detok = tok.detokenizer()
    deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some steps ended mid-character and held their bytes back


def test_incremental_detokenization_keeps_special_tokens_when_asked(tok):
    ids = tok.encode("<|im_start|>assistant\n多语言<|im_end|>")
    detok = tok.detokenizer(skip_special_tokens=False)
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=False)


def test_flush_emits_a_dangling_partial_character(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.add(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1]) != ""


def test_export_loads_offline_in_transformers(tok, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_hf_tokenizer("", str(tmp_path / "tok"))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<|im_start|>"
    hf = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert hf.eos_token_id == 2
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(messages)
    # and our own loader reads the exported directory back
    again = load_tokenizer(out)
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert again.eos_token_ids == (2,) and again.chat_template == tok.chat_template


def test_hf_directory_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    src = export_hf_tokenizer("", str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "eos_token_id": 2})
    )
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = load_tokenizer(src)
    assert ours.eos_token_ids == (2, 0)
    hf = AutoTokenizer.from_pretrained(src)
    assert ours.encode(TEXTS[4]) == hf.encode(TEXTS[4], add_special_tokens=False)


def test_tokenizer_does_not_import_torch():
    code = "import sys, router_ensemble.text.tokenizer as t; t.load_tokenizer(''); assert 'torch' not in sys.modules, 'torch imported'"
    root = str(Path(__file__).resolve().parents[3])
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert result.returncode == 0, result.stderr
