"""KubernetesConnector against a local HTTP server, not a real cluster.

`FakeCluster` runs a `ThreadingHTTPServer` on 127.0.0.1 that answers only the Kubernetes API
paths the connector uses (the StatefulSet / Deployment objects and their `scale`
subresources, and the pod list), and records every request. The connector talks to it
through a real `kubernetes.client.ApiClient`, so the official client's serialization,
content types and model validation are exercised; the controller is modelled only as far
as the connector observes it: after a PATCH the status catches up `lag` reads later, and a
removed pod stays terminating for `linger` pod lists.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client import ApiClient, AppsV1Api, Configuration, V1LabelSelector
from kubernetes.client import V1LabelSelectorRequirement as Requirement

from planner.connectors.kubernetes import (
    KubernetesConnector,
    WorkloadRef,
    label_selector,
    parse_workloads,
)
from trident.core.errors import ConfigError, TridentError

NS = "trident"
STS = WorkloadRef("StatefulSet", "trident-decode")
DEPLOY = WorkloadRef("Deployment", "trident-prefill")
PLURAL = {"StatefulSet": "statefulsets", "Deployment": "deployments"}


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    ready: bool = True
    leaving: int | None = None  # pod lists left while terminating; None: not terminating


@dataclass
class Workload:
    ref: WorkloadRef
    spec: int
    lag: int | None = 1  # status reads after a PATCH before it catches up; None: never
    linger: int = 0  # pod lists a removed pod stays terminating
    generation: int = 1
    observed: int = 1
    ready: int = 0
    replicas: int = 0
    reads_left: int | None = None
    pods: list[Pod] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.converge()

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.ref.name, "tier": "worker"}

    def pod_name(self, i: int) -> str:
        return (
            f"{self.ref.name}-{i}"
            if self.ref.kind == "StatefulSet"
            else f"{self.ref.name}-5d8f7-p{i}"
        )

    def converge(self) -> None:
        """What the controller does: pods up to spec, the highest ones beyond it leave."""
        staying = [p for p in self.pods if p.leaving is None]
        for i in range(len(staying), self.spec):
            self.pods.append(Pod(self.pod_name(i), self.labels))
        for pod in staying[self.spec :]:
            pod.leaving = self.linger
        self.pods = [p for p in self.pods if p.leaving != 0]
        self.ready = self.replicas = self.spec
        self.observed, self.reads_left = self.generation, None

    def patch(self, replicas: int) -> None:
        self.spec, self.generation, self.reads_left = replicas, self.generation + 1, self.lag

    def read(self) -> None:
        if self.reads_left is None:
            return
        if self.reads_left == 0:
            self.converge()
        else:
            self.reads_left -= 1


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: object


class FakeCluster:
    """The API paths the connector uses, over workloads held in memory."""

    def __init__(self) -> None:
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.extra_pods: list[Pod] = []
        self.requests: list[Request] = []
        self.failures: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, workload: Workload) -> Workload:
        self.workloads[(PLURAL[workload.ref.kind], workload.ref.name)] = workload
        return workload

    def made(self, method: str, path_end: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_end)]

    def handle(self, request: Request) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(request)
            if (request.method, request.path) in self.failures:
                return _status(*self.failures[(request.method, request.path)])
            return self._route(request)

    def _route(self, request: Request) -> tuple[int, dict]:
        parts = request.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and parts[4:] == ["pods"] and parts[3] == NS:
            return 200, self._pods(request.query.get("labelSelector", [""])[0])
        if parts[:4] != ["apis", "apps", "v1", "namespaces"] or len(parts) < 7 or parts[4] != NS:
            return _status(404, "NotFound", f"no route for {request.path}")
        workload = self.workloads.get((parts[5], parts[6]))
        if workload is None:
            return _status(404, "NotFound", f'{parts[5]}.apps "{parts[6]}" not found')
        if parts[7:] == ["scale"]:
            if request.method == "PATCH":
                workload.patch(request.body["spec"]["replicas"])
            return 200, _scale_json(workload)
        workload.read()
        return 200, _workload_json(workload)

    def _pods(self, selector: str) -> dict:
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        pods = [p for w in self.workloads.values() for p in w.pods] + self.extra_pods
        items = [_pod_json(p) for p in pods if wanted.items() <= p.labels.items()]
        for w in self.workloads.values():
            for pod in w.pods:
                pod.leaving = None if pod.leaving is None else pod.leaving - 1
            w.pods = [p for p in w.pods if p.leaving != 0]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            request = Request(
                self.command, url.path, parse_qs(url.query), self.headers.get("Content-Type"), body
            )
            code, payload = cluster.handle(request)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return code, body


def _meta(name: str, **extra: object) -> dict:
    return {"name": name, "namespace": NS, **extra}


def _pod_json(pod: Pod) -> dict:
    meta = _meta(pod.name, labels=pod.labels)
    if pod.leaving is not None:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ready = {"type": "Ready", "status": "True" if pod.ready else "False"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "tritonserver", "image": "tritonserver"}]},
        "status": {"phase": "Running", "conditions": [ready]},
    }


def _workload_json(w: Workload) -> dict:
    template = {
        "metadata": {"labels": w.labels},
        "spec": {"containers": [{"name": "tritonserver", "image": "tritonserver"}]},
    }
    spec = {"replicas": w.spec, "selector": {"matchLabels": w.labels}, "template": template}
    if w.ref.kind == "StatefulSet":
        spec["serviceName"] = w.ref.name
    return {
        "apiVersion": "apps/v1",
        "kind": w.ref.kind,
        "metadata": _meta(w.ref.name, generation=w.generation),
        "spec": spec,
        "status": {
            "replicas": w.replicas,
            "readyReplicas": w.ready,
            "observedGeneration": w.observed,
        },
    }


def _scale_json(w: Workload) -> dict:
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": _meta(w.ref.name),
        "spec": {"replicas": w.spec},
        "status": {"replicas": w.replicas},
    }


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fake = FakeCluster()
    thread = threading.Thread(
        target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def api(cluster: FakeCluster) -> Iterator[ApiClient]:
    client = ApiClient(Configuration(host=cluster.url))
    yield client
    client.close()


@pytest.fixture
def connect(api: ApiClient) -> Iterator:
    made: list[KubernetesConnector] = []

    def make(timeout_s: float = 2.0, poll_s: float = 0.01) -> KubernetesConnector:
        conn = KubernetesConnector(
            {"decode": STS, "prefill": DEPLOY}, NS, api=api, timeout_s=timeout_s, poll_s=poll_s
        )
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


def test_parse_workloads_reads_pools_kinds_and_names() -> None:
    pools = parse_workloads(
        " decode = StatefulSet/trident-decode , prefill=deployment/trident-prefill"
    )
    assert pools == {"decode": STS, "prefill": DEPLOY}
    assert str(pools["decode"]) == "statefulset/trident-decode"


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("", "''"),
        ("decode", "'decode'"),
        ("decode=trident-decode", "'decode=trident-decode'"),
        ("=statefulset/a", "'=statefulset/a'"),
        ("decode=statefulset/", "'decode=statefulset/'"),
        ("decode=daemonset/a", "kind 'daemonset'"),
        ("decode=statefulset/Trident_Decode", "'Trident_Decode'"),
        ("decode=statefulset/a,decode=deployment/b", "pool 'decode' is given twice"),
    ],
)
def test_parse_workloads_names_the_bad_part(spec: str, names: str) -> None:
    with pytest.raises(ConfigError, match=f"workloads: .*{names}"):
        parse_workloads(spec)


def test_workload_ref_refuses_other_kinds() -> None:
    with pytest.raises(ConfigError, match="'DaemonSet'"):
        WorkloadRef("DaemonSet", "x")  # type: ignore[arg-type]


def test_label_selector_joins_labels_and_expressions() -> None:
    selector = V1LabelSelector(
        match_labels={"tier": "worker", "app": "x"},
        match_expressions=[
            Requirement(key="pool", operator="In", values=["decode", "prefill"]),
            Requirement(key="canary", operator="DoesNotExist"),
        ],
    )
    assert label_selector(selector) == "app=x,tier=worker,pool in (decode,prefill),!canary"


def test_replicas_of_a_statefulset_are_its_ready_ordinals(cluster: FakeCluster, connect) -> None:
    decode = cluster.add(Workload(STS, spec=3))
    cluster.add(Workload(DEPLOY, spec=0))
    conn = connect()
    decode.ready = 2  # the third pod is still starting
    assert conn.replicas()["decode"] == ("trident-decode-0", "trident-decode-1")
    decode.spec = 1  # scaling down: ordinal 1 is ready but leaving
    assert conn.replicas()["decode"] == ("trident-decode-0",)


def test_replicas_of_a_deployment_are_its_ready_pods(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=0))
    prefill = cluster.add(Workload(DEPLOY, spec=3))
    prefill.pods[1].ready = False
    prefill.pods.append(Pod("trident-prefill-5d8f7-old", prefill.labels, leaving=5))
    cluster.extra_pods.append(Pod("other-5d8f7-p0", {"app": "other", "tier": "worker"}))
    assert connect().replicas() == {
        "decode": (),
        "prefill": ("trident-prefill-5d8f7-p0", "trident-prefill-5d8f7-p2"),
    }
    (listing,) = cluster.made("GET", f"/namespaces/{NS}/pods")
    assert listing.query["labelSelector"] == ["app=trident-prefill,tier=worker"]


@pytest.mark.parametrize("ref", [STS, DEPLOY], ids=["statefulset", "deployment"])
@pytest.mark.parametrize(("start", "target"), [(1, 3), (3, 1)], ids=["up", "down"])
def test_scale_patches_the_scale_subresource_and_waits_until_ready(
    cluster: FakeCluster, connect, ref: WorkloadRef, start: int, target: int
) -> None:
    cluster.add(Workload(STS if ref is DEPLOY else DEPLOY, spec=1))
    workload = cluster.add(Workload(ref, spec=start, lag=2))
    conn = connect()
    conn.scale("decode" if ref is STS else "prefill", target)

    path = f"/apis/apps/v1/namespaces/{NS}/{PLURAL[ref.kind]}/{ref.name}"
    assert len(cluster.made("GET", path + "/scale")) == 1
    (patch,) = cluster.made("PATCH", path + "/scale")
    assert patch.path == path + "/scale"
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"spec": {"replicas": target}}
    assert len(cluster.made("GET", path)) == 3  # two stale reads, then caught up
    assert workload.ready == target
    assert len(conn.replicas()["decode" if ref is STS else "prefill"]) == target


def test_scale_down_returns_once_removed_pods_are_gone(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=1))
    prefill = cluster.add(Workload(DEPLOY, spec=3, lag=0, linger=2))
    connect().scale("prefill", 1)
    assert len(cluster.made("GET", f"/namespaces/{NS}/pods")) == 3  # two lists still see them
    assert [p.name for p in prefill.pods] == ["trident-prefill-5d8f7-p0"]


def test_scale_to_the_current_size_sends_no_patch(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=2))
    connect().scale("decode", 2)
    assert cluster.made("PATCH", "/scale") == []


def test_a_scale_that_never_becomes_ready_times_out(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=1, lag=None))
    conn = connect(timeout_s=0.2)
    began = time.monotonic()
    with pytest.raises(
        TridentError,
        match=r"statefulset/trident-decode .* did not reach 3 ready replicas within 0.2s \(status is for generation 1, spec is 2\)",
    ):
        conn.scale("decode", 3)
    assert time.monotonic() - began < 1.0


@pytest.mark.parametrize(
    ("method", "code", "reason", "said"),
    [
        ("GET", 404, "NotFound", "read scale of statefulset/trident-decode .* HTTP 404 Not Found"),
        (
            "PATCH",
            403,
            "Forbidden",
            "patch scale of statefulset/trident-decode .* HTTP 403 Forbidden",
        ),
    ],
)
def test_an_api_error_names_the_workload_and_status(
    cluster: FakeCluster, connect, method: str, code: int, reason: str, said: str
) -> None:
    cluster.add(Workload(STS, spec=1))
    message = f"the server says {reason}"  # the Status body's message reaches the error
    cluster.failures[
        (method, f"/apis/apps/v1/namespaces/{NS}/statefulsets/trident-decode/scale")
    ] = (code, reason, message)
    with pytest.raises(TridentError, match=f"{said}: {message}$") as info:
        connect().scale("decode", 2)
    assert "namespace 'trident'" in str(info.value)


def test_an_unreachable_api_server_is_a_trident_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = ApiClient(Configuration(host=f"http://127.0.0.1:{port}"))
    conn = KubernetesConnector({"decode": STS}, NS, api=AppsV1Api(api), timeout_s=1)
    with pytest.raises(
        TridentError, match="read statefulset/trident-decode in namespace 'trident' failed"
    ):
        conn.replicas()
    conn.close()
    api.close()


def test_unknown_pools_and_negative_targets_are_refused(cluster: FakeCluster, connect) -> None:
    conn = connect()
    with pytest.raises(
        TridentError, match=r"unknown pool 'mixed' \(known: \['decode', 'prefill'\]\)"
    ):
        conn.scale("mixed", 1)
    with pytest.raises(TridentError, match="target -1 is negative"):
        conn.scale("decode", -1)
    assert cluster.requests == []


def test_close_twice_is_fine_and_later_calls_fail_clearly(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=1))
    conn = connect()
    conn.close()
    conn.close()
    with pytest.raises(TridentError, match="closed"):
        conn.scale("decode", 2)
    assert cluster.requests == []


def test_close_ends_a_scale_that_is_waiting(cluster: FakeCluster, connect) -> None:
    cluster.add(Workload(STS, spec=1, lag=None))
    conn = connect(timeout_s=30, poll_s=0.05)
    errors: list[BaseException] = []

    def scale() -> None:
        try:
            conn.scale("decode", 2)
        except TridentError as exc:
            errors.append(exc)

    thread = threading.Thread(target=scale)
    thread.start()
    time.sleep(0.1)
    conn.close()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert "closed" in str(errors[0])


def test_a_wrong_api_object_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ApiClient or AppsV1Api, not str"):
        KubernetesConnector({"decode": STS}, NS, api="http://localhost")


def test_without_an_api_it_loads_the_kubeconfig(
    cluster: FakeCluster, tmp_path, monkeypatch
) -> None:
    cluster.add(Workload(STS, spec=2))
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": cluster.url}}],
                "users": [{"name": "planner", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "planner"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    conn = KubernetesConnector({"decode": STS}, NS)
    assert conn.replicas() == {"decode": ("trident-decode-0", "trident-decode-1")}
    conn.close()
    conn.close()


def test_no_cluster_configuration_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no cluster configuration.*set KUBECONFIG"):
        KubernetesConnector({"decode": STS}, NS)


def test_a_missing_client_package_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(ConfigError, match="pip install kubernetes"):
        KubernetesConnector({"decode": STS}, NS)
