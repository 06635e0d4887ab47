"""What the deployment tests read (tests/docker/conftest.py makes fixtures of it): docker/'s files, parsed once, and the settings the code knows.

Nothing here runs a container: there is no Docker daemon or cluster on the test machines. The
Dockerfile is linted, the manifests schema-validated, and every setting they pass is checked
against the configuration classes that read it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
K8S_CLUSTER = K8S / "cluster"  # the multi-node deployment, a kustomization of its own
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint.sh"

# The oldest minor still common on managed clusters, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.33.0", "1.37.0")

# Variables the deployment sets that are not Trident's, with why.
EXTERNAL_ENV = {
    "PATH": "the image's venv first: the Python-backend stub finds its packages through it",
    "POD_IP": "the downward API's status.podIP, expanded into TRIDENT_NODE_ADDRESS and TRIDENT_HOST",
    "POD_NAME": "the downward API's metadata.name, expanded into etcd's arguments",
    "POD_NAMESPACE": "the downward API's metadata.namespace, expanded into etcd's arguments",
}


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]


def load_manifests(directory: Path = K8S) -> list[Manifest]:
    """Every Kubernetes object in `directory` (docker/k8s, or docker/k8s/cluster), not below it
    (kustomization.yaml is kustomize's, not the API's)."""
    found = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [Manifest(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def dockerfile_env(text: str) -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (the image that runs)."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` with nothing set: the default; `${VAR:?msg}`: `<VAR>`."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        return _INTERPOLATION.sub(
            lambda m: m.group(3) if m.group(2) == "-" else f"<{m.group(1)}>", value
        )
    return value


def known_env_names() -> dict[str, str]:
    """Every environment variable the code reads through its configuration classes -> where.

    Each class is filled from `<prefix><FIELD>` (trident.core.flags / trident.core.settings);
    add a class here when the deployment starts setting its variables.
    """
    from frontend.args import ENV_PREFIX as FRONTEND_PREFIX
    from frontend.args import FrontendConfig
    from planner.config import ADMIN_KEY_ENV, PlannerConfig
    from planner.config import ENV_PREFIX as PLANNER_PREFIX
    from plugins.torch_engine.config import TorchEngineConfig
    from router_ensemble.orchestration.disagg import DisaggConfig
    from router_ensemble.routing.config import ENV_PREFIX as ROUTER_PREFIX
    from router_ensemble.routing.config import RoutingConfig
    from trident.core.cluster_secret import SECRET_ENV, SECRET_FILE_ENV
    from trident.core.endpoints import EVENTS_DIR_ENV
    from trident.core.node import NodeConfig
    from trident.serve_config import ENV_PREFIX as SERVE_PREFIX
    from trident.serve_config import ServeConfig

    known: dict[str, str] = {}
    for cls, prefix in (
        (ServeConfig, SERVE_PREFIX),
        (TorchEngineConfig, SERVE_PREFIX),
        (NodeConfig, SERVE_PREFIX),  # trident.core.node reads TRIDENT_<KEY> (load_settings)
        (RoutingConfig, ROUTER_PREFIX),
        (DisaggConfig, ROUTER_PREFIX),
        (PlannerConfig, PLANNER_PREFIX),
        (FrontendConfig, FRONTEND_PREFIX),
    ):
        for f in fields(cls):
            known.setdefault(prefix + f.name.upper(), f"{cls.__module__}.{cls.__name__}.{f.name}")
    known[EVENTS_DIR_ENV] = "trident.core.endpoints.EVENTS_DIR_ENV"
    known[ADMIN_KEY_ENV] = "planner.config.ADMIN_KEY_ENV"
    known[SECRET_FILE_ENV] = "trident.core.cluster_secret.SECRET_FILE_ENV"
    known[SECRET_ENV] = "trident.core.cluster_secret.SECRET_ENV"
    for name in re.findall(r"\$\{?(TRIDENT_[A-Z0-9_]+)", ENTRYPOINT.read_text()):
        known.setdefault(name, "docker/entrypoint.sh")
    return known


def unknown_env(names: set[str], known: dict[str, str]) -> list[str]:
    return sorted(n for n in names if n not in known and n not in EXTERNAL_ENV)


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind and (name is None or m.name == name)]


def validate_strictly(manifests: list[Manifest], version: str) -> None:
    """Fail the test, naming the file and field, unless every manifest validates strictly
    (unknown fields refused) against Kubernetes `version`'s schemas."""
    import kubernetes_validate
    import pytest

    for m in manifests:
        try:
            kubernetes_validate.validate(m.doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{m.path.name} {m.kind}/{m.name}: {list(exc.path)}: {exc.message}")


def check_served_ports(manifests: list[Manifest], container: dict[str, Any], config: Any) -> set[str]:
    """Assert that the server container exposes exactly the ports its `ServeConfig` serves on,
    by name, and that the `trident` Service targets each of them; returns the port names."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": config.http_port,
        "grpc": config.grpc_port,
        "metrics": config.metrics_port,
        "openai": config.openai_port,
    }
    service = find(manifests, "Service", "trident")[0].doc
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    return set(ports)
