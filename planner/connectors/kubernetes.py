"""The Kubernetes connector: scales the worker pools by changing their workloads' replicas.

Who calls it: `planner.main` builds it when `--connector kubernetes` is given (the pools from
`parse_workloads`); `planner.loop`'s decision thread calls `replicas()` and its action thread
calls `scale(pool, target)`, one call at a time (see `planner.connectors.base`).

What it owns: nothing in the cluster but the `spec.replicas` of the workloads it was handed.
Each pool is one StatefulSet or Deployment in one namespace; `scale` goes through the
workload's `scale` subresource (a merge patch of `{"spec": {"replicas": N}}`, the same call
`kubectl scale` makes, so it needs only the `statefulsets/scale` / `deployments/scale`
permission besides `get` on the workload and `list` on pods), then polls until the
controller reports `target` replicas, all ready, for the current generation, and no pod of
the workload is still terminating. It owns the `ApiClient` only when it loaded the config
itself (in-cluster first, then kubeconfig); one passed in is the caller's to close.

Draining: the connector never deletes pods. On a scale-down the controller removes pods
(a StatefulSet always the highest ordinal; a Deployment picks one) and each gets SIGTERM;
tritonserver then refuses new requests and waits up to `--exit-timeout-secs` for in-flight
ones. The manifests (a later issue) must therefore set `--exit-timeout-secs` on
tritonserver and a pod `terminationGracePeriodSeconds` larger than it, or the kubelet
kills requests mid-flight. `scale` returns only once the removed pods are gone, so a
removal has drained by then.

Serving replicas (`replicas()`): for a StatefulSet, `<name>-0 .. <name>-(n-1)` with
`n = min(readyReplicas, spec.replicas)` (an OrderedReady StatefulSet readies ordinals in
order, and a pod above `spec.replicas` is being removed, not serving); for a Deployment, the
pods matched by its selector that are Running, Ready and not terminating, sorted by name.

`kubernetes` is imported lazily, so importing this module needs no client package. Tested
without a cluster (tests/planner/test_kubernetes_connector.py): a local HTTP server answers
the API paths used here, and the official client talks to it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from trident.core.errors import ConfigError, TridentError

logger = logging.getLogger(__name__)

WorkloadKind = Literal["StatefulSet", "Deployment"]
_KINDS: dict[str, WorkloadKind] = {"statefulset": "StatefulSet", "deployment": "Deployment"}
# A DNS-1123 subdomain, what Kubernetes accepts as a workload name.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# The scale subresource accepts JSON merge patch; the client's default for a patch
# (`application/json-patch+json`) expects a list of operations and would be refused.
_MERGE_PATCH = "application/merge-patch+json"
_MAX_REQUEST_S = 30.0


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """One pool's workload: `kind` is "StatefulSet" or "Deployment"."""

    kind: WorkloadKind
    name: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS.values():
            raise ConfigError(f"workload kind {self.kind!r}: expected StatefulSet or Deployment")
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"workload name {self.name!r}: expected a DNS-1123 name")

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name}"


def parse_workloads(spec: str) -> dict[str, WorkloadRef]:
    """Parse `decode=statefulset/trident-decode,prefill=deployment/trident-prefill`."""
    pools: dict[str, WorkloadRef] = {}
    for part in (p.strip() for p in spec.split(",")):
        pool, sep, workload = (s.strip() for s in part.partition("="))
        kind, slash, name = (s.strip() for s in workload.partition("/"))
        if not (pool and sep and slash and name):
            raise ConfigError(f"workloads: {part!r} is not <pool>=<statefulset|deployment>/<name>")
        if kind.lower() not in _KINDS:
            raise ConfigError(
                f"workloads: {part!r}: kind {kind!r} is not statefulset or deployment"
            )
        if pool in pools:
            raise ConfigError(f"workloads: pool {pool!r} is given twice")
        try:
            pools[pool] = WorkloadRef(_KINDS[kind.lower()], name)
        except ConfigError as exc:
            raise ConfigError(f"workloads: {part!r}: {exc}") from exc
    return pools


def label_selector(selector: Any) -> str:
    """A `V1LabelSelector` as the `label_selector` query string of a list call."""
    terms = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for req in selector.match_expressions or ():
        values = ",".join(req.values or ())
        terms.append(
            {
                "In": f"{req.key} in ({values})",
                "NotIn": f"{req.key} notin ({values})",
                "Exists": req.key,
                "DoesNotExist": f"!{req.key}",
            }[req.operator]
        )
    return ",".join(terms)


def _is_serving(pod: Any) -> bool:
    """Running, Ready, and not being deleted."""
    if pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
    return pod.status.phase == "Running" and ready


@dataclass(frozen=True, slots=True)
class _WorkloadApi:
    """The three calls one workload kind needs, bound to an `AppsV1Api`."""

    read: Callable[..., Any]
    read_scale: Callable[..., Any]
    patch_scale: Callable[..., Any]


def _import_kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError as exc:
        raise ConfigError(
            "connector kubernetes needs the `kubernetes` package: pip install kubernetes"
        ) from exc
    return kubernetes


def _load_api_client(kubernetes: Any) -> Any:
    """In-cluster service account first, then kubeconfig ($KUBECONFIG, read now)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)
    # The loaders raise ConfigException, OSError and YAML errors alike; all mean "no config".
    except Exception as incluster:
        try:
            kubernetes.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"),
                client_configuration=configuration,
                persist_config=False,
            )
        except Exception as kubeconfig:
            raise ConfigError(
                "connector kubernetes: no cluster configuration: not in a pod "
                f"({incluster}) and no usable kubeconfig ({kubeconfig}); "
                "set KUBECONFIG or run the planner with a service account"
            ) from kubeconfig
        return kubernetes.client.ApiClient(configuration)


class KubernetesConnector:
    """Scales StatefulSets / Deployments through their scale subresource (module docstring)."""

    name = "kubernetes"
    # replicas() are pod names, not the `worker` labels of /metrics: the planner then reads
    # every worker it scrapes (one server's /metrics; scraping every pod is multi-node work)
    model_names = False

    def __init__(
        self,
        pools: Mapping[str, WorkloadRef],
        namespace: str,
        api: Any | None = None,
        timeout_s: float = 600,
        poll_s: float = 2.0,
    ) -> None:
        if not pools:
            raise ConfigError("connector kubernetes: no pools given")
        if not namespace:
            raise ConfigError("connector kubernetes: namespace is empty")
        if timeout_s <= 0 or poll_s <= 0:
            raise ConfigError(
                f"connector kubernetes: timeout_s={timeout_s} and poll_s={poll_s} must be > 0"
            )
        self._pools = dict(pools)
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._request_s = min(timeout_s, _MAX_REQUEST_S)
        self._closed = threading.Event()
        k = _import_kubernetes()
        self._api_error = k.client.ApiException
        # urllib3 (the client's transport) raises its own errors for refused or dropped
        # connections; ValueError covers a response the client's models refuse.
        import urllib3

        self._transport_errors = (
            k.client.exceptions.OpenApiException,
            urllib3.exceptions.HTTPError,
            OSError,
            ValueError,
        )
        self._api_client, self._apps, self._owns_client = self._clients(k, api)
        self._core = k.client.CoreV1Api(self._api_client)
        self._kinds = {
            "StatefulSet": _WorkloadApi(
                self._apps.read_namespaced_stateful_set,
                self._apps.read_namespaced_stateful_set_scale,
                self._apps.patch_namespaced_stateful_set_scale,
            ),
            "Deployment": _WorkloadApi(
                self._apps.read_namespaced_deployment,
                self._apps.read_namespaced_deployment_scale,
                self._apps.patch_namespaced_deployment_scale,
            ),
        }

    @staticmethod
    def _clients(k: Any, api: Any | None) -> tuple[Any, Any, bool]:
        if api is None:
            client = _load_api_client(k)
            return client, k.client.AppsV1Api(client), True
        if isinstance(api, k.client.AppsV1Api):
            return api.api_client, api, False
        if isinstance(api, k.client.ApiClient):
            return api, k.client.AppsV1Api(api), False
        raise ConfigError(
            f"connector kubernetes: api must be an ApiClient or AppsV1Api, not {type(api).__name__}"
        )

    def replicas(self) -> Mapping[str, tuple[str, ...]]:
        return {pool: self._serving(ref) for pool, ref in self._pools.items()}

    def scale(self, pool: str, target: int) -> None:
        ref = self._ref(pool)
        if target < 0:
            raise TridentError(f"connector kubernetes: pool {pool!r}: target {target} is negative")
        deadline = time.monotonic() + self._timeout_s
        ops = self._kinds[ref.kind]
        current = self._call(ref, "read scale of", ops.read_scale, ref.name, self._namespace)
        if current.spec.replicas != target:
            logger.info(
                "scaling pool=%s %s from %s to %d", pool, ref, current.spec.replicas, target
            )
            body = {"spec": {"replicas": target}}
            self._call(
                ref,
                "patch scale of",
                ops.patch_scale,
                ref.name,
                self._namespace,
                body,
                _content_type=_MERGE_PATCH,
            )
        self._wait(pool, ref, target, deadline)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._owns_client:
            self._api_client.close()

    def _ref(self, pool: str) -> WorkloadRef:
        if pool not in self._pools:
            raise TridentError(
                f"connector kubernetes: unknown pool {pool!r} (known: {sorted(self._pools)})"
            )
        return self._pools[pool]

    def _wait(self, pool: str, ref: WorkloadRef, target: int, deadline: float) -> None:
        while (pending := self._pending(ref, target)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TridentError(
                    f"connector kubernetes: {ref} in namespace {self._namespace!r} did not reach "
                    f"{target} ready replicas within {self._timeout_s:g}s ({pending})"
                )
            if self._closed.wait(min(self._poll_s, left)):
                raise TridentError(f"connector kubernetes: closed while scaling {ref}")
        logger.info("pool=%s %s has %d ready replicas", pool, ref, target)

    def _pending(self, ref: WorkloadRef, target: int) -> str | None:
        """What still differs from `target` ready replicas, or None when settled."""
        workload = self._call(ref, "read", self._kinds[ref.kind].read, ref.name, self._namespace)
        status, generation = workload.status, workload.metadata.generation
        replicas, ready = status.replicas or 0, status.ready_replicas or 0
        observed = status.observed_generation
        if observed is not None and generation is not None and observed < generation:
            return f"status is for generation {observed}, spec is {generation}"
        if replicas != target or ready != target:
            return f"replicas={replicas} ready={ready}"
        leaving = [
            p.metadata.name for p in self._pods(ref, workload) if p.metadata.deletion_timestamp
        ]
        return f"still terminating: {', '.join(sorted(leaving))}" if leaving else None

    def _serving(self, ref: WorkloadRef) -> tuple[str, ...]:
        workload = self._call(ref, "read", self._kinds[ref.kind].read, ref.name, self._namespace)
        if ref.kind == "StatefulSet":
            count = min(workload.status.ready_replicas or 0, workload.spec.replicas or 0)
            return tuple(f"{ref.name}-{i}" for i in range(count))
        return tuple(sorted(p.metadata.name for p in self._pods(ref, workload) if _is_serving(p)))

    def _pods(self, ref: WorkloadRef, workload: Any) -> list[Any]:
        selector = label_selector(workload.spec.selector)
        pods = self._call(
            ref,
            "list pods of",
            self._core.list_namespaced_pod,
            self._namespace,
            label_selector=selector,
        )
        return list(pods.items)

    def _call(
        self, ref: WorkloadRef, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """One API call; every failure becomes a TridentError naming the workload."""
        if self._closed.is_set():
            raise TridentError(f"connector kubernetes: closed ({what} {ref})")
        where = f"connector kubernetes: {what} {ref} in namespace {self._namespace!r} failed"
        try:
            return fn(*args, _request_timeout=self._request_s, **kwargs)
        except self._api_error as exc:
            raise TridentError(
                f"{where}: HTTP {exc.status} {exc.reason}: {_api_message(exc)}"
            ) from exc
        except self._transport_errors as exc:
            raise TridentError(f"{where}: {type(exc).__name__}: {exc}") from exc


def _api_message(exc: Any) -> str:
    """The `message` of the API server's Status body, else the raw body."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.body or "").strip()[:200]
