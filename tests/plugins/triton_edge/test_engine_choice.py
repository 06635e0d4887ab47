"""Which engine a worker builds: the `engine` parameter, overridden by TRIDENT_ENGINE."""

from __future__ import annotations

import pytest

from plugins.triton.engines import engine_kind
from trident.core.errors import ConfigError


def test_parameter_then_environment() -> None:
    assert engine_kind({}, env={}) == "torch"
    assert engine_kind({"engine": "${ENGINE}"}, env={}) == "torch"  # a template value is unset
    assert engine_kind({"engine": "vllm"}, env={}) == "vllm"
    assert engine_kind({"engine": "vllm"}, env={"TRIDENT_ENGINE": "torch"}) == "torch"
    assert engine_kind({}, env={"TRIDENT_ENGINE": "trtllm"}) == "trtllm"


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'tensorflow'"):
        engine_kind({"engine": "tensorflow"}, env={})
