"""The planner's Roles against the requests its Kubernetes connector makes: docker/k8s/planner.yaml
(the single-node server Deployment) and docker/k8s/cluster/planner.yaml (the decode StatefulSet).

A local HTTP server plays the API server for the workload the planner scales (the manifest's
own object: its selector, its pod labels) and records every request; the connector, through the official
client, reads the pool and scales it up and back down. Each request is turned into the RBAC
attributes the API server would authorize (verb, API group, resource/subresource, name) and
must be allowed by the Role, and every permission the Role grants must have been used: a
connector that starts calling something new, or a Role that grants more, fails here.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client import ApiClient, Configuration

from planner.connectors.kubernetes import KubernetesConnector, parse_workloads
from tests.docker.deployment_files import K8S, K8S_CLUSTER, Manifest, find, load_manifests

VERBS = {
    ("GET", True): "get",
    ("GET", False): "list",
    ("PATCH", True): "patch",
    ("PUT", True): "update",
    ("POST", False): "create",
    ("DELETE", True): "delete",
}


@dataclass(frozen=True)
class Attributes:
    """What the API server authorizes one request by."""

    verb: str
    group: str
    resource: str  # "deployments/scale" for a subresource
    name: str | None
    namespace: str


def attributes(method: str, path: str) -> Attributes:
    """/apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>[/<sub>]] (core: /api/v1/...)."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces", f"not a namespaced request: {path}"
    namespace, resource, tail = rest[1], rest[2], rest[3:]
    name = tail[0] if tail else None
    if len(tail) > 1:
        resource += "/" + tail[1]
    return Attributes(VERBS[(method, name is not None)], group, resource, name, namespace)


def allowed(rule: dict[str, Any], a: Attributes) -> bool:
    return (
        a.group in rule["apiGroups"]
        and a.resource in rule["resources"]
        and a.verb in rule["verbs"]
        and (not rule.get("resourceNames") or a.name in rule["resourceNames"])
    )


class FakeApiServer:
    """The workload (a Deployment or a StatefulSet), its scale subresource and its pods; a
    PATCH converges at once."""

    def __init__(self, workload: dict[str, Any]) -> None:
        self.workload = copy.deepcopy(workload)
        self.plural = {"Deployment": "deployments", "StatefulSet": "statefulsets"}[workload["kind"]]
        self.workload["metadata"]["generation"] = 1
        for container in self.workload["spec"]["template"]["spec"]["containers"]:
            for quantities in container.get("resources", {}).values():  # served as strings
                quantities.update({k: str(v) for k, v in quantities.items()})
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def replicas(self) -> int:
        return self.workload["spec"]["replicas"]

    def answer(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, dict]:
        with self.lock:
            self.requests.append((method, path, query))
            meta = self.workload["metadata"]
            if path.endswith("/pods"):
                return 200, self._pods(query.get("labelSelector", [""])[0])
            if not path.endswith(f"/{self.plural}/{meta['name']}") and not path.endswith("/scale"):
                return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
            if method == "PATCH":
                self.workload["spec"]["replicas"] = body["spec"]["replicas"]
                meta["generation"] += 1
            n = self.replicas
            status = {"replicas": n, "readyReplicas": n, "observedGeneration": meta["generation"]}
            if path.endswith("/scale"):
                scale_meta = {"name": meta["name"], "namespace": meta["namespace"]}
                return 200, {
                    "apiVersion": "autoscaling/v1",
                    "kind": "Scale",
                    "metadata": scale_meta,
                    "spec": {"replicas": n},
                    "status": {"replicas": n},
                }
            return 200, {**self.workload, "status": status}

    def pod_name(self, i: int) -> str:
        """A StatefulSet's pods are <name>-<ordinal>; a Deployment's get a random suffix."""
        name = self.workload["metadata"]["name"]
        return f"{name}-{i}" if self.plural == "statefulsets" else f"{name}-p{i}"

    def _pods(self, selector: str) -> dict:
        labels = self.workload["spec"]["template"]["metadata"]["labels"]
        namespace = self.workload["metadata"]["namespace"]
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        assert wanted and wanted.items() <= labels.items(), f"selector {selector!r} misses the pods"
        ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        items = [
            {
                "metadata": {"name": self.pod_name(i), "namespace": namespace, "labels": labels},
                "status": ready,
            }
            for i in range(self.replicas)
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, payload = api.answer(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module", params=["single-node", "cluster"])
def manifests(request: pytest.FixtureRequest) -> list[Manifest]:
    """The deployment whose planner is checked (shadows conftest's single-node `manifests`)."""
    return load_manifests(K8S if request.param == "single-node" else K8S_CLUSTER)


def _namespace(manifests: list[Manifest]) -> str:
    return find(manifests, "Role", "trident-planner")[0].doc["metadata"]["namespace"]


@pytest.fixture
def connector_requests(manifests: list[Manifest]) -> Iterator[list[Attributes]]:
    """The connector's requests while it reads the pool and scales it 1 -> 2 -> 1."""
    config = find(manifests, "ConfigMap", "trident-planner-config")[0].doc["data"]
    pools = parse_workloads(config["TRIDENT_PLANNER_K8S_WORKLOADS"])
    (ref,) = pools.values()
    workload = find(manifests, ref.kind, ref.name)[0].doc
    assert workload["spec"]["replicas"] == 1, "the scale below starts from one replica"
    api = FakeApiServer(workload)
    thread = threading.Thread(target=api.server.serve_forever, daemon=True)
    thread.start()
    client = ApiClient(Configuration(host=api.url))
    namespace = _namespace(manifests)
    connector = KubernetesConnector(pools, namespace, api=client, timeout_s=10, poll_s=0.01)
    try:
        (pool,) = pools
        assert connector.replicas()[pool] == (api.pod_name(0),)
        connector.scale(pool, 2)
        assert len(connector.replicas()[pool]) == 2
        connector.scale(pool, 1)
        yield [attributes(method, path) for method, path, _ in api.requests]
    finally:
        connector.close()
        client.close()
        api.server.shutdown()
        api.server.server_close()


def test_the_role_allows_every_request_of_the_connector(manifests, connector_requests) -> None:
    role = find(manifests, "Role", "trident-planner")[0].doc
    for a in connector_requests:
        assert a.namespace == role["metadata"]["namespace"]
        assert any(allowed(rule, a) for rule in role["rules"]), f"the Role does not allow {a}"


def test_the_role_grants_nothing_the_connector_does_not_use(manifests, connector_requests) -> None:
    role = find(manifests, "Role", "trident-planner")[0].doc
    used = {(a.group, a.resource, a.verb) for a in connector_requests}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert (group, resource, verb) in used, (
                        f"unused grant: {verb} {group}/{resource}"
                    )
    assert {"patch"} <= {a.verb for a in connector_requests}, "the scale-up was not exercised"


def test_a_request_outside_the_role_is_refused(manifests) -> None:
    role = find(manifests, "Role", "trident-planner")[0].doc
    ns = _namespace(manifests)
    for method, path in (
        ("DELETE", f"/api/v1/namespaces/{ns}/pods/trident-server-p0"),
        ("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/trident-planner/scale"),
        ("PATCH", f"/apis/apps/v1/namespaces/{ns}/statefulsets/trident-prefill/scale"),
        ("PATCH", f"/apis/apps/v1/namespaces/{ns}/statefulsets/trident-etcd/scale"),
        ("GET", f"/api/v1/namespaces/{ns}/secrets/trident-api-key"),
        ("GET", f"/api/v1/namespaces/{ns}/secrets/trident-cluster-secret"),
    ):
        a = attributes(method, path)
        assert not any(allowed(rule, a) for rule in role["rules"]), a
