"""Repository-wide test setup: import path and the default model's location."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """Absolute path of the default SmolLM2 GGUF; fails (with the install command) if it is missing."""
    from trident.errors import ModelLoadError
    from trident.model_files import default_model_path as locate

    try:
        return locate()
    except ModelLoadError as exc:
        pytest.fail(str(exc))
