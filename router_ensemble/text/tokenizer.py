"""Tokenizers for GGUF files and Hugging Face directories, without torch or transformers.

The router model tokenizes prompts (and renders chat templates) with this module; the
engines and the frontend detokenize with it. A GGUF carries its tokenizer as metadata
(`tokenizer.ggml.*`): we rebuild it as a `tokenizers.Tokenizer` the same way transformers'
GGUF converter does, so ids match `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
exactly. A Hugging Face directory brings `tokenizer.json` and `tokenizer_config.json`.

`export_hf_tokenizer` writes a local tokenizer directory that transformers (and tools built
on it, such as aiperf) can load with no hub access.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from router_ensemble.text.chat_template import compile_template, normalize_messages
from trident.core.errors import ModelLoadError, ValidationError
from trident.core.model_files import (
    GGUFFile,
    gguf_eos_token_ids,
    hf_eos_token_ids,
    model_id_for,
    read_gguf,
    read_json,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# `tokenizer.ggml.pre` -> the split regex the vocabulary was trained with (as in transformers'
# GGUF converter). Types not listed use GPT-2's byte-level regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


class Tokenizer:
    """Text <-> token ids and chat templates for one model.

    Built once per process by `load_tokenizer`; immutable afterwards, so any thread may
    call it (the underlying `tokenizers.Tokenizer` is thread-safe). Each streaming request
    takes its own `detokenizer()`.
    """

    __slots__ = (
        "_tok",
        "_template",
        "_template_src",
        "_special",
        "_eos_ids",
        "_bos_id",
        "_model_id",
        "_max_len",
    )

    def __init__(
        self,
        tok: _HFTokenizer,
        *,
        model_id: str,
        chat_template: str | None,
        special_tokens: dict[str, str | None],
        eos_token_ids: Sequence[int],
        bos_token_id: int | None,
        max_length: int | None = None,
    ) -> None:
        self._tok = tok
        self._template_src = chat_template
        self._template = compile_template(chat_template) if chat_template else None
        self._special = dict(special_tokens)
        self._eos_ids = tuple(eos_token_ids)
        self._bos_id = bos_token_id
        self._model_id = model_id
        self._max_len = max_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def chat_template(self) -> str | None:
        return self._template_src

    @property
    def backend(self) -> _HFTokenizer:
        """The `tokenizers.Tokenizer` (read-only use)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValidationError("text_input", f"must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render OpenAI-style messages to the prompt text; bad messages -> `ValidationError("messages")`."""
        if self._template is None:
            raise ValidationError(
                "messages", f"model {self._model_id} has no chat template; send a prompt instead"
            )
        chat = normalize_messages(messages)
        context = {k: v for k, v in self._special.items() if v is not None}
        context.update(kwargs)
        try:
            return self._template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **context
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ValidationError(
                "messages", f"chat template rejected the messages: {exc}"
            ) from exc

    def save(self, out_dir: str) -> None:
        """Write tokenizer.json + tokenizer_config.json that transformers loads offline."""
        os.makedirs(out_dir, exist_ok=True)
        self._tok.save(os.path.join(out_dir, "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,  # a BOS, if the model wants one, is in tokenizer.json's post-processor
            "add_eos_token": False,
            **{k: v for k, v in self._special.items() if v is not None},
        }
        if self._max_len:
            config["model_max_length"] = self._max_len
        if self._template_src:
            config["chat_template"] = self._template_src
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas, one request at a time.

    Owned by the request's streaming loop (one thread). `add` returns only text that is
    complete: a tail decoding to U+FFFD (an unfinished multi-byte character split across
    tokens) is held back until the next tokens complete it. Uses vLLM's prefix/read offsets
    so each step decodes a short window, not the whole output.
    """

    __slots__ = ("_tok", "_skip", "_ids", "_read")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer.backend
        self._skip = skip_special_tokens
        # `_ids` starts at vLLM's prefix offset: the tokens decoded again as context so that
        # the text of the tokens from `_read` on comes out exactly as in a full decode.
        self._ids: list[int] = []
        self._read = 0  # ids before this were returned as text already

    def add(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        for token_id in ids:
            self._ids.append(int(token_id))
            prefix_text = self._decode(self._read)
            new_text = self._decode(len(self._ids))
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                out.append(new_text[len(prefix_text) :])
                self._advance()
        return "".join(out)

    def flush(self) -> str:
        """Whatever is held back (a dangling partial character comes out as U+FFFD)."""
        prefix_text = self._decode(self._read)
        new_text = self._decode(len(self._ids))
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        # The returned tokens become the next step's context; older ones are no longer needed.
        del self._ids[: self._read]
        self._read = len(self._ids)

    def _decode(self, end: int) -> str:
        return self._tok.decode(self._ids[:end], skip_special_tokens=self._skip) if end else ""


def load_tokenizer(model_path: str) -> Tokenizer:
    """The tokenizer of a GGUF file or a Hugging Face directory ("" = the default model).

    A directory holding only tokenizer files (as `export_hf_tokenizer` writes) works too.
    """
    if model_path and os.path.isfile(
        os.path.join(os.path.expanduser(model_path), "tokenizer.json")
    ):
        return _from_hf_dir(os.path.abspath(os.path.expanduser(model_path)))
    path = resolve_model_path(model_path)
    if os.path.isdir(path):
        return _from_hf_dir(path)
    return _from_gguf(read_gguf(path))


def export_hf_tokenizer(model_path: str, out_dir: str) -> str:
    """Write the model's tokenizer as a Hugging Face tokenizer directory; returns `out_dir`."""
    load_tokenizer(model_path).save(out_dir)
    return out_dir


# ---------------------------------------------------------------- GGUF


def _from_gguf(gguf: GGUFFile) -> Tokenizer:
    meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{gguf.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the Hugging Face directory of this model instead"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    if not tokens or not merges:
        raise ModelLoadError(
            f"{gguf.path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing"
        )

    alphabet = _BYTE_ALPHABET
    vocab = {
        (t if set(t) <= alphabet else "".join(_BYTE_TO_UNICODE[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    # Control tokens are matched whole and count as special; a "control" token spelled outside the
    # byte alphabet is a llama.cpp mislabel and adding it would grow the vocabulary.
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ == _CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ == _USER_DEFINED and t in vocab
        ]
    )

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return (
            tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None
        )

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    bos_token = special("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return Tokenizer(
        tok,
        model_id=model_id_for(gguf.path),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={
            "bos_token": bos_token,
            "eos_token": special("eos_token_id"),
            "unk_token": special("unknown_token_id"),
            "pad_token": special("padding_token_id"),
        },
        eos_token_ids=gguf_eos_token_ids(meta),
        bos_token_id=bos_id if isinstance(bos_id, int) else None,
        max_length=gguf.arch_value("context_length"),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_BYTE_TO_UNICODE = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_TO_UNICODE.values())


# ---------------------------------------------------------------- Hugging Face directory


def _from_hf_dir(model_dir: str) -> Tokenizer:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"{path}: file is missing (only fast tokenizers, tokenizer.json, are supported)"
        )
    try:
        tok = _HFTokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise ModelLoadError(f"{path}: cannot load tokenizer: {exc}") from exc
    config = read_json(os.path.join(model_dir, "tokenizer_config.json"), required=False)
    model_config = read_json(os.path.join(model_dir, "config.json"), required=False)
    special = {
        name: _token_content(config.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }

    eos_ids = list(hf_eos_token_ids(model_dir))
    eos_from_config = tok.token_to_id(special["eos_token"]) if special["eos_token"] else None
    if eos_from_config is not None and eos_from_config not in eos_ids:
        eos_ids.append(eos_from_config)
    bos_id = tok.token_to_id(special["bos_token"]) if special["bos_token"] else None
    if bos_id is None and isinstance(model_config.get("bos_token_id"), int):
        bos_id = model_config["bos_token_id"]
    return Tokenizer(
        tok,
        model_id=model_id_for(model_dir),
        chat_template=_hf_chat_template(model_dir, config),
        special_tokens=special,
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        max_length=model_config.get("max_position_embeddings"),
    )


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(model_dir: str, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
