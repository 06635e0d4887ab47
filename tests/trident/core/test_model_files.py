"""Locating model files and parsing GGUF headers."""

from __future__ import annotations

import os

import pytest

from trident.core.errors import ModelLoadError
from trident.core.model_files import model_id_for, read_gguf, resolve_model_path


def test_default_model_is_found(default_model_path):
    assert os.path.isfile(default_model_path)
    assert resolve_model_path("") == default_model_path
    assert resolve_model_path(default_model_path) == default_model_path
    assert model_id_for(default_model_path) == "SmolLM2-135M-Instruct.Q4_1"


def test_header_matches_gguf_package(default_model_path):
    from gguf import GGUFReader

    ours = read_gguf(default_model_path)
    theirs = GGUFReader(default_model_path)
    assert ours.architecture == "llama" and ours.arch_value("block_count") == 30
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert [(t.name, t.offset, t.ggml_type) for t in ours.tensors] == [
        (t.name, t.data_offset, int(t.tensor_type)) for t in theirs.tensors
    ]
    assert [t.shape for t in ours.tensors] == [
        tuple(int(d) for d in reversed(t.shape)) for t in theirs.tensors
    ]


def test_bad_paths_name_the_path_and_problem(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model_path(str(missing))
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match=f"{text}: not a GGUF file"):
        resolve_model_path(str(text))
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="no config.json.*weights.gguf"):
        resolve_model_path(str(tmp_path))


def test_truncated_header_is_a_model_load_error(tmp_path, default_model_path):
    with open(default_model_path, "rb") as f:
        head = f.read(200_000)  # cuts through the vocabulary
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelLoadError, match=f"{bad}: corrupt or truncated GGUF header"):
        read_gguf(str(bad))
