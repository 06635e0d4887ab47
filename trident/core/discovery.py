"""Which workers exist on other nodes: a static list, or etcd (what Dynamo uses on bare metal).

A `WorkerRecord` says where one worker model on some node's tritonserver is reached: its
cluster-wide id (`<node>/<model>`), its pool, the node's Triton gRPC address and the worker's
KV event endpoint. Records come from

- a static list (`static_records`): JSON, inline or in a file, for a fixed cluster;
- etcd (`EtcdRegistration`, `EtcdWorkers`): each worker puts its record under
  `<prefix>/workers/<node>/<model>` with a lease it keeps alive; the router reads the prefix
  every `poll_s`; a node that dies stops renewing and its records vanish when the lease
  expires (`ttl_s`), so the router drops its workers.

Records in etcd are signed: the value carries an HMAC-SHA256 of the record keyed by the
cluster's secret (`trident.core.cluster_secret`), and a
record whose tag does not verify is ignored and logged, so a process that can write to etcd
but lacks the secret cannot pose as a worker.

etcd is spoken to through its v3 JSON gateway (`/v3/...`, on the client port) with httpx:
no client library. Who calls what: a worker model starts one `EtcdRegistration` after its
engine runs and closes it first at shutdown (its own thread, "etcd-lease-<worker>", renews
the lease; no Triton call); the router's discovery reads `EtcdWorkers.records()`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from trident.core.errors import ConfigError

logger = logging.getLogger(__name__)
# httpx logs every request at INFO: a lease renewal and an etcd read every second or so
# would fill the server log; its warnings still show
logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_PREFIX = "/trident"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One remote worker: `worker` is `<node>/<model>`."""

    worker: str
    pool: str
    grpc: str  # host:port of the node's tritonserver
    events: str  # tcp://host:port of the worker's KV event publisher

    @property
    def node(self) -> str:
        return self.worker.partition("/")[0]

    @property
    def model(self) -> str:
        return self.worker.partition("/")[2]

    def validate(self) -> WorkerRecord:
        node, slash, model = self.worker.partition("/")
        if not (node and slash and model) or "/" in model:
            raise ConfigError(f"worker: expected <node>/<model>, got {self.worker!r}")
        if not self.pool:
            raise ConfigError(f"worker {self.worker}: pool is empty")
        host, _, port = self.grpc.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"worker {self.worker}: grpc: expected host:port, got {self.grpc!r}")
        if not self.events.startswith("tcp://"):
            raise ConfigError(f"worker {self.worker}: events: expected tcp://host:port, got {self.events!r}")
        return self

    @classmethod
    def from_dict(cls, raw: Any) -> WorkerRecord:
        if not isinstance(raw, dict):
            raise ConfigError(f"worker record: expected an object, got {type(raw).__name__}")
        try:
            return cls(**{k: str(raw[k]) for k in ("worker", "pool", "grpc", "events")}).validate()
        except KeyError as exc:
            raise ConfigError(f"worker record: {exc.args[0]} is missing") from None


def static_records(spec: str) -> list[WorkerRecord]:
    """Records from inline JSON (a list of objects) or the path of a JSON file holding one."""
    spec = spec.strip()
    if not spec:
        return []
    text = spec if spec.startswith("[") else _read(spec)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"remote workers: not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise ConfigError("remote workers: expected a JSON list of worker records")
    records = [WorkerRecord.from_dict(item) for item in raw]
    seen = set()
    for r in records:
        if r.worker in seen:
            raise ConfigError(f"remote workers: {r.worker} is listed twice")
        seen.add(r.worker)
    return records


def _read(path: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"remote workers: cannot read {path!r}: {exc}") from None


def sign_record(record: WorkerRecord, secret: bytes) -> str:
    body = json.dumps(asdict(record), sort_keys=True).encode()
    return hmac.new(secret, b"trident-worker-record\0" + body, hashlib.sha256).hexdigest()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class EtcdClient:
    """The few etcd v3 calls discovery needs, over the JSON gateway. Thread-safe."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"etcd endpoint: expected http(s)://host:port, got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s)

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        resp = self._http.post(f"{self.endpoint}/v3/{path}", json=body)
        if resp.status_code != 200:
            raise httpx.HTTPStatusError(f"etcd {path}: {resp.status_code} {resp.text[:200]}",
                                        request=resp.request, response=resp)
        return resp.json()

    def grant(self, ttl_s: int) -> str:
        return str(self._call("lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: str) -> int:
        """Renew `lease`; its remaining TTL (0: it had expired)."""
        result = self._call("lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", 0))

    def revoke(self, lease: str) -> None:
        self._call("lease/revoke", {"ID": lease})

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._call("kv/put", body)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = self._call("kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs", [])
        }

    def close(self) -> None:
        self._http.close()


class EtcdRegistration:
    """A worker's record in etcd under a lease kept alive by a thread of its own.

    `start()` grants the lease and puts the record; every `ttl_s / 3` the thread renews it
    (and, if the lease had expired, e.g. after etcd was unreachable for a while, grants a
    new one and puts the record again). `close()` revokes the lease: the record goes at
    once, not after `ttl_s`."""

    def __init__(self, client: EtcdClient, record: WorkerRecord, secret: bytes, *,
                 prefix: str = DEFAULT_PREFIX, ttl_s: int = 5) -> None:
        if not secret:
            raise ConfigError("etcd discovery needs the cluster secret (TRIDENT_KV_SECRET_FILE or TRIDENT_KV_SECRET)")
        if ttl_s < 2:
            raise ConfigError(f"ttl_s must be >= 2, got {ttl_s}")
        self.client = client
        self.record = record.validate()
        self.key = f"{prefix.rstrip('/')}/workers/{record.worker}"
        self.value = json.dumps({"record": asdict(record), "auth": sign_record(record, secret)})
        self.ttl_s = ttl_s
        self.lease: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EtcdRegistration:
        self._register()
        self._thread = threading.Thread(target=self._run, name=f"etcd-lease-{self.record.model}", daemon=True)
        self._thread.start()
        logger.info("discovery: registered %s in etcd at %s (lease %s, ttl %d s)",
                    self.record.worker, self.client.endpoint, self.lease, self.ttl_s)
        return self

    def _register(self) -> None:
        self.lease = self.client.grant(self.ttl_s)
        self.client.put(self.key, self.value, self.lease)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.lease is None or self.client.keepalive(self.lease) <= 0:
                    logger.warning("discovery: lease of %s expired; registering again", self.record.worker)
                    self._register()
            except httpx.HTTPError as exc:
                logger.warning("discovery: cannot renew the lease of %s: %s", self.record.worker, exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lease is not None:
            try:
                self.client.revoke(self.lease)
            except httpx.HTTPError as exc:  # it expires on its own
                logger.warning("discovery: cannot revoke the lease of %s: %s", self.record.worker, exc)
            self.lease = None


class EtcdWorkers:
    """The router's view of the workers registered in etcd: the verified records, read at
    most every `poll_s` (on the calling thread; a failed read keeps the last view)."""

    def __init__(self, client: EtcdClient, secret: bytes | None, *, prefix: str = DEFAULT_PREFIX,
                 poll_s: float = 1.0, clock: Any = time.monotonic) -> None:
        if not secret:
            raise ConfigError("etcd discovery needs the cluster secret (TRIDENT_KV_SECRET_FILE or TRIDENT_KV_SECRET)")
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/workers/"
        self._secret = secret
        self.poll_s = poll_s
        self._clock = clock
        self._read_at = float("-inf")
        self._records: dict[str, WorkerRecord] = {}
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    def records(self) -> dict[str, WorkerRecord]:
        with self._lock:
            now = self._clock()
            if now - self._read_at >= self.poll_s:
                self._read_at = now
                try:
                    self._records = self._read()
                except httpx.HTTPError as exc:
                    logger.warning("discovery: cannot read etcd at %s: %s", self.client.endpoint, exc)
            return dict(self._records)

    def _read(self) -> dict[str, WorkerRecord]:
        out = {}
        for key, value in self.client.get_prefix(self.prefix).items():
            try:
                raw = json.loads(value)
                record = WorkerRecord.from_dict(raw["record"])
                if not hmac.compare_digest(str(raw.get("auth", "")), sign_record(record, self._secret)):
                    raise ConfigError("not signed with this cluster's secret")
                if key != self.prefix + record.worker:
                    raise ConfigError(f"record of {record.worker} under another key")
            except (ConfigError, ValueError, KeyError, TypeError) as exc:
                if key not in self._refused:
                    self._refused.add(key)
                    logger.warning("discovery: ignoring etcd key %s: %s", key, exc)
                continue
            out[record.worker] = record
        return out
