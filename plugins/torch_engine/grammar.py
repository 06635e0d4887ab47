"""Structured outputs in the torch engine: xgrammar grammars, one token mask per step.

Who calls what, on which thread:

- `Grammars.compile(spec_text)` runs in `TorchEngine.submit` (the caller's thread: a Triton
  model's `execute`), so a schema compiles off the engine loop; compiled grammars are kept in
  an LRU keyed by the spec's canonical text (`StructuredSpec.key`). A schema, pattern or
  grammar xgrammar refuses raises `ValidationError("structured_outputs.<kind>", ...)`. The
  tokenizer info xgrammar needs is built once, on first use, from the vocabulary in the
  model file the engine loaded (`vocab_from_model`): GGUF metadata or `tokenizer.json`.
- `GrammarBatch` lives on the loop thread. `add` gives a request its matcher and replays the
  tokens it already produced elsewhere (a decode worker's `first_token` after the prefill
  handoff, a migrated request's last `output_offset` prompt tokens); `mask(logits, seqs)`
  fills one bitmask row per constrained sequence and applies them all with one
  `apply_token_bitmask_inplace` call, right before the sampler; `accept` advances a matcher
  with the sampled token and says whether the grammar has terminated (the request then
  ends with "stop"); `remove` drops a finished request's matcher.

xgrammar's stop tokens are the model's EOS ids: once the output is complete the mask allows
only them, so a constrained request ends at EOS like any other (or at once if it ignores EOS).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from trident.core.errors import ValidationError
from trident.core.model_files import is_gguf, read_gguf, read_json, resolve_model_path
from trident.core.structured import FIELD, StructuredSpec, parse_structured_outputs

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[01:21:20] /project/cpp/x.cc:83: "
_CONTROL = 3  # GGUF token_type of a control (special) token


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTES = _byte_decoder()


def _token_bytes(token: str) -> bytes:
    if all(c in _BYTES for c in token):
        return bytes(_BYTES[c] for c in token)
    return token.encode("utf-8")  # an added token spelled in plain text


def vocab_from_model(model_path: str) -> list[bytes]:
    """Each token id's bytes (b"" for special tokens, which no grammar may emit), from the
    model file the engine loads: a byte-level BPE GGUF or a Hugging Face `tokenizer.json`."""
    path = resolve_model_path(model_path)
    if is_gguf(path):
        meta = read_gguf(path).metadata
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        return [
            b"" if kind == _CONTROL else _token_bytes(t)
            for t, kind in zip(tokens, types, strict=True)
        ]
    spec = read_json(f"{path}/tokenizer.json")
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *special.keys()]) + 1
    out = [b""] * size
    for token, i in vocab.items():
        out[i] = _token_bytes(token)
    for i, t in special.items():
        out[i] = b"" if t.get("special") else t["content"].encode("utf-8")
    return out


class Grammars:
    """Compiled grammars of one engine, by spec; any thread (a lock guards the LRU)."""

    def __init__(
        self, model_path: str, vocab_size: int, eos_token_ids: Sequence[int], capacity: int = 64
    ) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.compiles = 0  # grammars compiled (cache misses), for tests and stats

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        import xgrammar as xgr

        if self._compiler is None:
            vocab = vocab_from_model(self.model_path)
            info = xgr.TokenizerInfo(
                vocab,
                xgr.VocabType.RAW,
                vocab_size=self.vocab_size,
                stop_token_ids=list(self.eos_token_ids),
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, text: str) -> Any:
        """The compiled grammar of the spec `text` (`xgrammar.CompiledGrammar`)."""
        spec = parse_structured_outputs(text)
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
            compiler = self._get_compiler()
        compiled = _compile(compiler, spec)
        with self._lock:
            self.compiles += 1
            self._cache[spec.key] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled


def _compile(compiler: xgrammar.GrammarCompiler, spec: StructuredSpec) -> Any:
    where = f"{FIELD}.{spec.kind}"
    try:
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value)
            return compiler.compile_grammar(f"root ::= {rule}")
        return compiler.compile_grammar(spec.value)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors derive from these
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        first = _XGR_PREFIX.sub("", lines[0])
        raise ValidationError(where, f"does not compile: {first}") from None


class GrammarBatch:
    """The matchers of the running constrained requests (engine loop thread only)."""

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._matchers: dict[str, xgrammar.GrammarMatcher] = {}
        self._bitmask = xgr.allocate_token_bitmask(max(1, max_rows), vocab_size)
        # xgrammar's CUDA default is its Triton kernel; triton is not installed here (Makefile).
        self._gpu_backend = (
            "triton" if importlib.util.find_spec("triton") is not None else "torch_native"
        )

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._matchers

    def add(self, request_id: str, compiled: Any, replay: Sequence[int] = ()) -> bool:
        """Start a matcher and feed it `replay`; False when a replayed token breaks the grammar."""
        matcher = self._xgr.GrammarMatcher(compiled)
        self._matchers[request_id] = matcher
        return all(matcher.accept_token(int(t)) for t in replay)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def terminated(self, request_id: str) -> bool:
        matcher = self._matchers.get(request_id)
        return matcher is not None and matcher.is_terminated()

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher; False when the grammar refuses `token`."""
        return self._matchers[request_id].accept_token(token)

    def mask(self, logits: torch.Tensor, request_ids: Sequence[str]) -> None:
        """Mask in place, in row i of `logits` [S, vocab], the tokens request_ids[i]'s grammar
        refuses now; rows without a grammar are left alone."""
        if not self._matchers:
            return
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return
        if len(request_ids) > self._bitmask.shape[0]:
            self._bitmask = self._xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        for i in rows:
            self._matchers[request_ids[i]].fill_next_token_bitmask(self._bitmask, i)
        bitmask = self._bitmask[: len(request_ids)]
        backend = "cpu"
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
            backend = self._gpu_backend
        self._xgr.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=self.vocab_size, indices=rows, backend=backend
        )


class EngineGrammar:
    """The torch engine's structured-outputs glue: `check` on the submitting thread, the rest
    on the loop thread. Nothing of xgrammar is imported until a constrained request comes."""

    def __init__(
        self, model_path: str, vocab_size: int, eos_token_ids: Sequence[int], max_rows: int
    ) -> None:
        self.grammars = Grammars(model_path, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.batch: GrammarBatch | None = None

    def check(self, spec_text: str | None, min_tokens: int = 0) -> None:
        """Compile (or find cached) the request's grammar; `ValidationError` if it cannot.

        `min_tokens` is refused with a grammar: the sampler bans EOS until then, and a
        completed grammar allows nothing else, which would leave no token to sample.
        """
        if spec_text is None:
            return
        if min_tokens:
            raise ValidationError("min_tokens", "is not supported with structured_outputs")
        self.grammars.compile(spec_text)

    def start(self, request_id: str, spec_text: str | None, replay: Sequence[int]) -> str | None:
        """Give a constrained request its matcher, fed `replay`; the reason it cannot go on
        ("error" or "stop": the replay already completed the grammar), else None."""
        if spec_text is None:
            return None
        if self.batch is None:
            self.batch = GrammarBatch(self.vocab_size, self.max_rows)
        if not self.batch.add(request_id, self.grammars.compile(spec_text), replay):
            self.batch.remove(request_id)
            return "error"
        if self.batch.terminated(request_id):
            self.batch.remove(request_id)
            return "stop"
        return None

    def mask(self, logits: torch.Tensor, seqs: Sequence[Any]) -> None:
        """`ModelRunner.logits_hook`: mask the constrained rows before the sampler."""
        if self.batch is not None and len(self.batch):
            self.batch.mask(logits, [s.request_id for s in seqs])

    def on_token(self, request_id: str, token: int) -> str | None:
        """After sampling: advance the matcher; "stop" when the grammar has terminated,
        "error" when it refused the token, else None."""
        if self.batch is None or request_id not in self.batch:
            return None
        if not self.batch.accept(request_id, token):
            return "error"
        return "stop" if self.batch.terminated(request_id) else None

    def finish(self, request_id: str) -> None:
        if self.batch is not None:
            self.batch.remove(request_id)
