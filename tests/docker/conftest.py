"""Fixtures of the deployment tests: docker/'s files parsed once (tests/docker/deployment_files.py)."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.docker.deployment_files import (
    COMPOSE,
    DOCKER,
    K8S_CLUSTER,
    Manifest,
    known_env_names,
    load_manifests,
)


@pytest.fixture(scope="session")
def manifests() -> list[Manifest]:
    return load_manifests()


@pytest.fixture(scope="session")
def cluster_manifests() -> list[Manifest]:
    return load_manifests(K8S_CLUSTER)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="session")
def known_env() -> dict[str, str]:
    return known_env_names()


@pytest.fixture(scope="session")
def healthcheck() -> ModuleType:
    """docker/healthcheck.py, imported from its file (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("trident_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
