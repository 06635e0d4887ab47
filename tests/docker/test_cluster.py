"""docker/k8s/cluster: the multi-node deployment (etcd, the router node, decode and prefill worker
nodes), validated against the strict schemas of pinned Kubernetes versions, its kustomization
against its files, and every setting against the code that reads it: names against the
configuration classes, values by building those classes with what each pod's environment
holds once Kubernetes has filled in the downward API and expanded `$(VAR)` references.

Nothing is applied to a cluster. Each checker also gets a broken input once, so a checker
that stopped checking fails too.
"""

from __future__ import annotations

import copy
import os
import re
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.docker.deployment_files import (
    DOCKERFILE,
    K8S,
    K8S_CLUSTER,
    K8S_VERSIONS,
    Manifest,
    check_served_ports,
    dockerfile_env,
    find,
    unknown_env,
    validate_strictly,
)
from trident.core.cluster_secret import SECRET_ENV, SECRET_FILE_ENV
from trident.core.errors import ConfigError
from trident.serve_config import ServeConfig

NAMESPACE = "trident-cluster"
POD_IP = "10.42.3.7"  # what the downward API would give; any IPv4 address
ROUTER = "trident-router"
ETCD = "trident-etcd"
# worker StatefulSet -> (decode, prefill) workers its pods run
WORKERS = {"trident-decode": (1, 0), "trident-prefill": (0, 1)}
NOT_APPLIED = {"secret.example.yaml", "planner.yaml"}  # templates / applied on their own
EXIT_TIMEOUT_S = 10 + 20  # tritonserver's --exit-timeout-secs, then trident serve's grace


# ---------------------------------------------------------------- helpers


def _pod(m: Manifest) -> dict[str, Any]:
    return m.doc["spec"]["template"]["spec"]


def _workloads(manifests: list[Manifest]) -> list[Manifest]:
    return find(manifests, "Deployment") + find(manifests, "StatefulSet")


def _workload(manifests: list[Manifest], name: str) -> Manifest:
    (found,) = [m for m in _workloads(manifests) if m.name == name]
    return found


def _containers(manifests: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    return [
        (w, c)
        for w in _workloads(manifests)
        for c in _pod(w).get("initContainers", []) + _pod(w)["containers"]
    ]


def _is_trident(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0] == "trident"


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, defined: dict[str, str]) -> tuple[str, list[str]]:
    """Kubernetes' `$(VAR)` expansion: a reference to a variable defined so far is replaced,
    `$$` is a literal `$`, any other reference stays as written (and is returned)."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1) in defined:
            return defined[m.group(1)]
        missing.append(m.group(1))
        return m.group(0)

    return _REF.sub(sub, value), missing


def spec_env(
    manifests: list[Manifest], container: dict[str, Any], pod_name: str
) -> tuple[dict[str, str], list[str]]:
    """The variables the container spec defines (envFrom, then env in order, each value
    expanded from those before it), and the references that did not resolve."""
    fields = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE, "status.podIP": POD_IP}
    env: dict[str, str] = {}
    missing: list[str] = []
    for source in container.get("envFrom", []):
        env.update(find(manifests, "ConfigMap", source["configMapRef"]["name"])[0].doc["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]], unresolved = expand(item["value"], env)
            missing += unresolved
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env, missing


def container_env(manifests: list[Manifest], workload: str, pod_name: str) -> dict[str, str]:
    """What the first container's process sees: the image's ENV, then the spec's variables.
    (Kubernetes expands references from the spec only, never from the image's ENV.)"""
    container = _pod(_workload(manifests, workload))["containers"][0]
    env, missing = spec_env(manifests, container, pod_name)
    assert not missing, f"{workload}: unresolved references {missing}"
    return {**dockerfile_env(DOCKERFILE.read_text()), **env}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for req in selector.get("matchExpressions", []):
        key, op, values = req["key"], req["operator"], req.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _pod_labels(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    return {w.name: w.doc["spec"]["template"]["metadata"]["labels"] for w in _workloads(manifests)}


def _selected(manifests: list[Manifest], selector: dict[str, Any]) -> set[str]:
    """The workloads whose pods `selector` matches."""
    return {name for name, labels in _pod_labels(manifests).items() if matches(selector, labels)}


def _mounts(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    container = pod["containers"][0]
    return (
        {v["mountPath"]: v for v in container["volumeMounts"]},
        {v["name"]: v for v in pod["volumes"]},
    )


# ---------------------------------------------------------------- schemas, kustomization, labels


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cluster_manifests_validate_strictly(version: str, cluster_manifests) -> None:
    assert {m.kind for m in cluster_manifests} == {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Secret",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    validate_strictly(cluster_manifests, version)


def test_strict_validation_rejects_an_unknown_statefulset_field(cluster_manifests) -> None:
    doc = copy.deepcopy(find(cluster_manifests, "StatefulSet", "trident-decode")[0].doc)
    doc["spec"]["serviceNmae"] = doc["spec"].pop("serviceName")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="serviceNmae"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def kustomization_mismatch(resources: list[str]) -> tuple[set[str], set[str]]:
    """(files of docker/k8s/cluster the resources miss, resources that are no such file);
    the Secret templates and the planner are left out on purpose."""
    files = {p.name for p in K8S_CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert NOT_APPLIED <= files
    return (files - NOT_APPLIED) - set(resources), set(resources) - (files - NOT_APPLIED)


def test_the_kustomization_lists_every_file_but_the_templates_and_the_planner(
    cluster_manifests,
) -> None:
    kustomization = yaml.safe_load((K8S_CLUSTER / "kustomization.yaml").read_text())
    assert kustomization_mismatch(kustomization["resources"]) == (set(), set())
    assert len(set(kustomization["resources"])) == len(kustomization["resources"])
    assert not {"namePrefix", "nameSuffix"} & set(kustomization), "names are referenced (env, RBAC)"
    namespace = kustomization["namespace"]
    assert namespace == NAMESPACE
    assert [m.name for m in find(cluster_manifests, "Namespace")] == [namespace]
    for m in cluster_manifests:
        if m.kind != "Namespace":
            assert m.doc["metadata"]["namespace"] == namespace, m.name
    # the single-node deployment's image, under the same kustomize name and tag
    (tag,) = kustomization["images"]
    single = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert [tag] == single
    images = {c["image"] for _, c in _containers(cluster_manifests) if _is_trident(c)}
    assert images == {f"{tag['name']}:{tag['newTag']}"}


def test_a_missing_or_extra_resource_is_caught() -> None:
    resources = yaml.safe_load((K8S_CLUSTER / "kustomization.yaml").read_text())["resources"]
    dropped = [r for r in resources if r != "prefill.yaml"]
    assert kustomization_mismatch(dropped) == ({"prefill.yaml"}, set())
    assert kustomization_mismatch([*resources, "planner.yaml", "gone.yaml"]) == (
        set(),
        {"planner.yaml", "gone.yaml"},
    )


def test_cluster_labels_and_selectors_are_consistent(cluster_manifests) -> None:
    for m in cluster_manifests:
        labels = m.doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "trident", m.name
        if m.kind != "Namespace":
            assert labels.get("app.kubernetes.io/name") == "trident", m.name
            assert labels.get("app.kubernetes.io/component"), m.name
    for w in _workloads(cluster_manifests):
        template = w.doc["spec"]["template"]["metadata"]["labels"]
        assert matches(w.doc["spec"]["selector"], template), w.name
        component = w.doc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert template["app.kubernetes.io/component"] == component, w.name
    # no two workloads' selectors overlap: each Service and policy below picks one pool
    pods = _pod_labels(cluster_manifests)
    for w in _workloads(cluster_manifests):
        assert _selected(cluster_manifests, w.doc["spec"]["selector"]) == {w.name}
    # every Service selects the pods of one workload, on ports those pods name
    for svc in find(cluster_manifests, "Service"):
        selector = svc.doc["spec"]["selector"]
        (target,) = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        names = _port_names(cluster_manifests, {target})
        assert {p["targetPort"] for p in svc.doc["spec"]["ports"]} <= names, svc.name
    for sts in find(cluster_manifests, "StatefulSet"):
        (headless,) = find(cluster_manifests, "Service", sts.doc["spec"]["serviceName"])
        assert headless.doc["spec"]["clusterIP"] == "None", headless.name
        assert headless.doc["spec"]["selector"] == sts.doc["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------- settings


def _set_names(manifests: list[Manifest]) -> set[str]:
    names = {k for m in find(manifests, "ConfigMap") for k in m.doc["data"]}
    for _, c in _containers(manifests):
        names |= {e["name"] for e in c.get("env", [])}
    return names


def test_every_cluster_variable_is_one_the_code_reads(cluster_manifests, known_env) -> None:
    names = _set_names(cluster_manifests)
    assert {"TRIDENT_ROLE", "TRIDENT_NODE_NAME", "TRIDENT_ETCD", SECRET_FILE_ENV} <= names
    assert unknown_env(names, known_env) == []
    assert unknown_env(names | {"TRIDENT_NODE_ADRESS"}, known_env) == ["TRIDENT_NODE_ADRESS"]


def test_every_reference_is_defined_before_it_is_used(cluster_manifests) -> None:
    for w, c in _containers(cluster_manifests):
        env, missing = spec_env(cluster_manifests, c, f"{w.name}-0")
        assert not missing, f"{w.name}/{c['name']}: $({missing[0]}) is not defined above it"
        for arg in c.get("command", []) + c.get("args", []):
            _, missing = expand(arg, env)
            assert not missing, f"{w.name}/{c['name']}: {arg} refers to undefined $({missing[0]})"


def test_a_reference_defined_too_late_is_caught(cluster_manifests) -> None:
    container = copy.deepcopy(_pod(_workload(cluster_manifests, "trident-decode"))["containers"][0])
    pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")
    container["env"].remove(pod_ip)
    container["env"].append(pod_ip)  # now after TRIDENT_NODE_ADDRESS and TRIDENT_HOST
    env, missing = spec_env(cluster_manifests, container, "trident-decode-0")
    assert missing == ["POD_IP", "POD_IP"] and env["TRIDENT_NODE_ADDRESS"] == "$(POD_IP)"


def test_the_cluster_secret_is_never_a_value(cluster_manifests) -> None:
    for m in find(cluster_manifests, "ConfigMap"):
        assert not {SECRET_ENV, "TRIDENT_API_KEY"} & set(m.doc["data"]), m.name
    for w, c in _containers(cluster_manifests):
        assert not {SECRET_ENV, "TRIDENT_API_KEY"} & {e["name"] for e in c.get("env", [])}, w.name
        argv = " ".join(c.get("command", []) + c.get("args", []))
        assert "secret" not in argv.lower(), f"{w.name}: a secret on the command line"
    for secret in find(cluster_manifests, "Secret"):
        assert secret.path.name == "secret.example.yaml" and "data" not in secret.doc
        assert set(secret.doc["stringData"].values()) == {"REPLACE-ME"}
    assert {s.name for s in find(cluster_manifests, "Secret")} == {
        "trident-cluster-secret",
        "trident-api-key",
    }


def _check_secret_mount(
    manifests: list[Manifest], pod: dict[str, Any], env: dict[str, str]
) -> None:
    mounts, volumes = _mounts(pod)
    secret_dir, secret_key = os.path.split(env[SECRET_FILE_ENV])
    assert mounts[secret_dir]["readOnly"]
    assert volumes[mounts[secret_dir]["name"]]["secret"]["secretName"] == "trident-cluster-secret"
    template = find(manifests, "Secret", "trident-cluster-secret")[0].doc
    assert secret_key in template["stringData"]
    assert SECRET_ENV not in env


def _check_models_mount(
    manifests: list[Manifest], pod: dict[str, Any], config: ServeConfig
) -> None:
    mounts, volumes = _mounts(pod)
    models = mounts[os.path.dirname(config.model)]
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert models["readOnly"] and claim["readOnly"]
    pvc = find(manifests, "PersistentVolumeClaim", claim["claimName"])[0].doc
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"], "pods on several nodes share it"


def _check_pod_hardening(pod: dict[str, Any]) -> None:
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and not pod["automountServiceAccountToken"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts, volumes = _mounts(pod)
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert not mounts["/tmp"].get("readOnly")
    assert pod["terminationGracePeriodSeconds"] > EXIT_TIMEOUT_S


def _etcd_client_url(manifests: list[Manifest]) -> str:
    svc = find(manifests, "Service", ETCD)[0].doc
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "client")
    return f"http://{svc['metadata']['name']}:{port}"


@pytest.mark.parametrize("workload", sorted(WORKERS))
def test_worker_nodes_are_valid_nodes_of_the_cluster(
    cluster_manifests, workload: str, healthcheck: ModuleType
) -> None:
    from plugins.torch_engine.config import TorchEngineConfig
    from trident.core.node import NodeConfig

    pod_name = f"{workload}-0"
    env = container_env(cluster_manifests, workload, pod_name)
    config = ServeConfig.from_env(env)  # validates: role, node name and address, host
    assert config.role == "worker" and (config.decode, config.prefill) == WORKERS[workload]
    assert config.node_name == pod_name
    assert config.node_address == config.host == POD_IP
    assert config.etcd == _etcd_client_url(cluster_manifests)
    assert config.device == "cuda"
    # what the launcher exports to tritonserver, where the workers read it
    served = {**env, **config.engine_env(), "TRIDENT_NODE_GRPC": f"{POD_IP}:{config.grpc_port}"}
    node = NodeConfig.from_mapping({}, served)
    assert node.node_name == pod_name and node.node_grpc == f"{POD_IP}:{config.grpc_port}"
    engine = TorchEngineConfig.from_mapping({}, served)
    assert engine.kv_transport == "nixl" and engine.kv_release_host == POD_IP

    sts = find(cluster_manifests, "StatefulSet", workload)[0]
    pod = _pod(sts)
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": config.http_port,
        "grpc": config.grpc_port,
        "metrics": config.metrics_port,
    }
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == 1
    _check_secret_mount(cluster_manifests, pod, env)
    _check_models_mount(cluster_manifests, pod, config)
    _check_pod_hardening(pod)
    mounts, _ = _mounts(pod)
    assert not mounts[env["TRIDENT_CACHE_DIR"]].get("readOnly"), "the weights cache is written"
    # probes: liveness on Triton; readiness by the health check, which on a worker node
    # requires the workers it loads and neither the router nor the frontend
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "docker/healthcheck.py" in " ".join(container["readinessProbe"]["exec"]["command"])
    expected = (["decode"] if config.decode else []) + (["prefill"] if config.prefill else [])
    assert healthcheck.urls(config) == [
        f"http://{POD_IP}:{config.http_port}/v2/health/ready",
        *(f"http://{POD_IP}:{config.http_port}/v2/models/{m}/ready" for m in expected),
    ]


def test_a_worker_without_its_pod_ip_is_refused(cluster_manifests) -> None:
    env = container_env(cluster_manifests, "trident-decode", "trident-decode-0")
    env["TRIDENT_HOST"] = "10.0.0.99"  # not the node address others dial
    with pytest.raises(ConfigError, match="host"):
        ServeConfig.from_env(env)


def test_the_router_node_finds_its_workers_in_etcd(cluster_manifests, healthcheck) -> None:
    env = container_env(cluster_manifests, ROUTER, "trident-router-5d9c7-x2x4q")
    config = ServeConfig.from_env(env)
    assert config.role == "router" and config.decode == 0 and config.prefill == 0
    assert config.etcd == _etcd_client_url(cluster_manifests) and not config.node_name
    assert config.host == "0.0.0.0" and config.openai_port > 0
    deployment = find(cluster_manifests, "Deployment", ROUTER)[0]
    pod = _pod(deployment)
    container = pod["containers"][0]
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"].get(kind, {}), "no engine here"
    check_served_ports(cluster_manifests, container, config)
    service = find(cluster_manifests, "Service", "trident")[0].doc
    assert service["spec"]["selector"] == deployment.doc["spec"]["selector"]["matchLabels"]
    _check_secret_mount(cluster_manifests, pod, env)
    _check_models_mount(cluster_manifests, pod, config)  # the tokenizer is in the model file
    _check_pod_hardening(pod)
    mounts, volumes = _mounts(pod)
    key_dir, key_name = os.path.split(env["TRIDENT_API_KEY_FILE"])
    assert volumes[mounts[key_dir]["name"]]["secret"]["secretName"] == "trident-api-key"
    assert key_name in find(cluster_manifests, "Secret", "trident-api-key")[0].doc["stringData"]
    assert "docker/healthcheck.py" in " ".join(container["readinessProbe"]["exec"]["command"])
    urls = healthcheck.urls(config)
    assert urls[1].endswith("/v2/models/router/ready")
    assert urls[-1] == f"http://127.0.0.1:{config.openai_port}/health/live"


# ---------------------------------------------------------------- etcd


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args)


def test_etcd_members_match_the_statefulset(cluster_manifests) -> None:
    sts = find(cluster_manifests, "StatefulSet", ETCD)[0].doc
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"quay\.io/coreos/etcd:v\d+\.\d+\.\d+", container["image"]), "pin a tag"
    assert sts["spec"]["podManagementPolicy"] == "Parallel", "members bootstrap together"
    n = sts["spec"]["replicas"]
    assert n in (1, 3, 5)
    headless = find(cluster_manifests, "Service", sts["spec"]["serviceName"])[0].doc
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    env, _ = spec_env(cluster_manifests, container, f"{ETCD}-1")
    flags = {k: expand(v, env)[0] for k, v in _flags(container["args"]).items()}
    assert flags["name"] == f"{ETCD}-1"
    domain = f"{headless['metadata']['name']}.{NAMESPACE}.svc"
    members = dict(m.split("=", 1) for m in flags["initial-cluster"].split(","))
    assert members == {f"{ETCD}-{i}": f"http://{ETCD}-{i}.{domain}:2380" for i in range(n)}
    assert flags["initial-advertise-peer-urls"] == members[f"{ETCD}-1"]
    assert flags["advertise-client-urls"] == f"http://{ETCD}-1.{domain}:2379"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert urlsplit(flags["listen-client-urls"]).port == ports["client"]
    assert urlsplit(flags["listen-peer-urls"]).port == ports["peer"]
    assert urlsplit(flags["listen-metrics-urls"]).port == ports["metrics"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    # the data directory is inside the claim of each member
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert flags["data-dir"].startswith(mount["mountPath"] + "/")
    # what Trident dials is the client Service, on the members' client port
    client = find(cluster_manifests, "Service", ETCD)[0].doc
    assert client["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    configmap = find(cluster_manifests, "ConfigMap", "trident-cluster-config")[0].doc["data"]
    assert configmap["TRIDENT_ETCD"] == _etcd_client_url(cluster_manifests)
    # a drain may take members only while a quorum stays
    pdb = find(cluster_manifests, "PodDisruptionBudget", ETCD)[0].doc
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]
    assert n - pdb["spec"]["maxUnavailable"] >= n // 2 + 1 or n == 1


# ---------------------------------------------------------------- network policies


def _peers(manifests: list[Manifest], rule: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "this namespace's pods only: no namespace or IP block"
        found |= _selected(manifests, peer["podSelector"])
    return found


def _port_names(manifests: list[Manifest], workloads: set[str]) -> set[str]:
    return {
        p["name"]
        for w in workloads
        for c in _pod(_workload(manifests, w))["containers"]
        for p in c.get("ports", [])
    }


def test_only_the_router_and_other_workers_reach_the_workers(cluster_manifests) -> None:
    policy = find(cluster_manifests, "NetworkPolicy", "trident-workers")[0].doc["spec"]
    workers = _selected(cluster_manifests, policy["podSelector"])
    assert workers == set(WORKERS)
    assert policy["policyTypes"] == ["Ingress"]
    allowed: dict[str, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        for peer in _peers(cluster_manifests, rule):
            allowed.setdefault(peer, []).extend(rule["ports"])
    assert {ROUTER, *WORKERS} <= set(allowed) <= {ROUTER, *WORKERS, "trident-planner"}
    assert ETCD not in allowed
    names = _port_names(cluster_manifests, workers)
    for peer, ports in allowed.items():
        assert all(p["protocol"] == "TCP" for p in ports)
        for p in ports:
            assert isinstance(p["port"], int) or p["port"] in names, p
        if peer == "trident-planner":
            assert ports == [{"protocol": "TCP", "port": "metrics"}], "the planner only scrapes"
            continue
        assert {"protocol": "TCP", "port": "grpc"} in ports
        # the event, NIXL and lease-release sockets bind random ports: the unprivileged range
        assert {"protocol": "TCP", "port": 1024, "endPort": 65535} in ports


def test_only_trident_pods_and_members_reach_etcd(cluster_manifests) -> None:
    policy = find(cluster_manifests, "NetworkPolicy", ETCD)[0].doc["spec"]
    assert _selected(cluster_manifests, policy["podSelector"]) == {ETCD}
    reach: dict[str, set[str]] = {}
    for rule in policy["ingress"]:
        for peer in _peers(cluster_manifests, rule):
            reach.setdefault(peer, set()).update(str(p["port"]) for p in rule["ports"])
    assert reach == {
        ROUTER: {"client"},
        "trident-decode": {"client"},
        "trident-prefill": {"client"},
        ETCD: {"client", "peer"},
    }
    assert {"client", "peer"} <= _port_names(cluster_manifests, {ETCD})


def test_a_policy_that_lets_etcd_reach_the_workers_is_caught(cluster_manifests) -> None:
    policy = copy.deepcopy(find(cluster_manifests, "NetworkPolicy", "trident-workers")[0].doc)
    rule = policy["spec"]["ingress"][0]
    rule["from"][0]["podSelector"]["matchExpressions"][0]["values"].append("etcd")
    assert ETCD in _peers(cluster_manifests, rule)


# ---------------------------------------------------------------- planner (applied on its own)


def test_the_cluster_planner_scales_the_decode_statefulset(cluster_manifests) -> None:
    from planner.config import PlannerConfig
    from planner.connectors.kubernetes import parse_workloads
    from planner.main import parse_args

    container = _pod(_workload(cluster_manifests, "trident-planner"))["containers"][0]
    env, missing = spec_env(cluster_manifests, container, "trident-planner-0")
    assert not missing
    config: PlannerConfig = parse_args([], {**dockerfile_env(DOCKERFILE.read_text()), **env})
    assert config.connector == "kubernetes" and config.k8s_namespace == NAMESPACE
    pools = parse_workloads(config.k8s_workloads)
    assert {p: str(r) for p, r in pools.items()} == {"decode": "statefulset/trident-decode"}
    assert find(cluster_manifests, "StatefulSet", "trident-decode")
    # one /metrics URL: trident-decode-0 through the headless Service, so one pod at most
    url = urlsplit(config.metrics_url)
    sts = find(cluster_manifests, "StatefulSet", "trident-decode")[0].doc
    assert url.hostname == f"trident-decode-0.{sts['spec']['serviceName']}"
    decode = _pod(_workload(cluster_manifests, "trident-decode"))["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in decode["ports"]}
    assert url.port == ports["metrics"] and url.path == "/metrics"
    assert config.max_decode == 1, "the planner sees one pod's metrics (docker/README.md)"
    binding = find(cluster_manifests, "RoleBinding", "trident-planner")[0].doc
    pod = _pod(_workload(cluster_manifests, "trident-planner"))
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert container["args"] == ["trident", "plan"]
