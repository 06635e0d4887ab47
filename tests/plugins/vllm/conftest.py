"""Fixtures the vLLM engine tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    from router_ensemble.text.tokenizer import load_tokenizer

    return load_tokenizer("")
