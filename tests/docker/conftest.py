"""Fixtures of the deployment tests: docker/'s files parsed once (tests/docker/deployment_files.py)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.docker.deployment_files import (
    COMPOSE,
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
