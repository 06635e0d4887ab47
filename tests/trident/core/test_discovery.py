"""Discovery against a real etcd: workers register under a lease they keep alive, the router
reads the verified records, a node that dies (stops renewing) drops out when its lease
expires, a record not signed with the cluster secret is ignored; and the static list."""

from __future__ import annotations

import json
import time

import pytest

from tests.etcd_server import etcd_server
from tests.waiting import wait_until
from trident.core.discovery import (
    EtcdClient,
    EtcdRegistration,
    EtcdWorkers,
    WorkerRecord,
    static_records,
)
from trident.core.errors import ConfigError

SECRET = b"discovery-test-secret-0123456789"
B = WorkerRecord("node-b/decode", "decode", "127.0.0.1:8101", "tcp://127.0.0.1:5600")
C = WorkerRecord("node-c/prefill", "prefill", "127.0.0.1:8201", "tcp://127.0.0.1:5700")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with etcd_server(tmp_path_factory.mktemp("etcd")) as url:
        yield url


def test_registered_workers_are_seen_and_leave_on_close(etcd) -> None:
    client = EtcdClient(etcd)
    view = EtcdWorkers(client, SECRET, prefix="/t1", poll_s=0.0)
    b = EtcdRegistration(client, B, SECRET, prefix="/t1", ttl_s=2).start()
    c = EtcdRegistration(client, C, SECRET, prefix="/t1", ttl_s=2).start()
    try:
        assert view.records() == {B.worker: B, C.worker: C}
        time.sleep(3)  # past the TTL: the keepalive thread renews it
        assert set(view.records()) == {B.worker, C.worker}
        c.close()  # revoked: gone at once
        assert view.records() == {B.worker: B}
    finally:
        b.close()
        c.close()
        client.close()
    assert EtcdWorkers(EtcdClient(etcd), SECRET, prefix="/t1").records() == {}


def test_a_node_that_stops_renewing_drops_out_when_its_lease_expires(etcd) -> None:
    client = EtcdClient(etcd)
    view = EtcdWorkers(client, SECRET, prefix="/t2", poll_s=0.0)
    dead = EtcdRegistration(client, B, SECRET, prefix="/t2", ttl_s=2).start()
    dead._stop.set()  # the node's process froze: nothing renews, nothing revokes
    dead._thread.join()
    assert B.worker in view.records()
    started = time.monotonic()
    wait_until(lambda: B.worker not in view.records(), timeout=10)
    assert time.monotonic() - started < 4
    client.close()


def test_records_without_the_cluster_secret_are_ignored(etcd, caplog) -> None:
    client = EtcdClient(etcd)
    forger = EtcdRegistration(client, B, b"not-the-cluster-secret-at-all!!!", prefix="/t3").start()
    forged = {"record": {"worker": "node-x/decode", "pool": "decode", "grpc": "10.9.9.9:1", "events": "tcp://10.9.9.9:2"},
              "auth": "00" * 32}
    client.put("/t3/workers/node-x/decode", json.dumps(forged))
    client.put("/t3/workers/node-y/decode", "not json")
    good = EtcdRegistration(client, C, SECRET, prefix="/t3").start()
    try:
        assert EtcdWorkers(client, SECRET, prefix="/t3").records() == {C.worker: C}
        assert "not signed with this cluster's secret" in caplog.text
    finally:
        good.close()
        forger.close()
        client.close()


def test_an_unreachable_etcd_keeps_the_last_view() -> None:
    view = EtcdWorkers(EtcdClient("http://127.0.0.1:1", timeout_s=0.5), SECRET, poll_s=0.0)
    assert view.records() == {}
    with pytest.raises(ConfigError, match="cluster secret"):
        EtcdWorkers(EtcdClient("http://127.0.0.1:1"), None)


def test_static_records_from_json_or_a_file(tmp_path) -> None:
    raw = json.dumps([{"worker": B.worker, "pool": "decode", "grpc": B.grpc, "events": B.events}])
    assert static_records(raw) == [B]
    path = tmp_path / "workers.json"
    path.write_text(raw)
    assert static_records(str(path)) == [B]
    assert static_records("") == []
    for bad, match in [
        ('[{"worker": "decode", "pool": "decode", "grpc": "h:1", "events": "tcp://h:2"}]', "<node>/<model>"),
        ('[{"worker": "n/decode", "pool": "decode", "grpc": "h", "events": "tcp://h:2"}]', "host:port"),
        ('[{"worker": "n/decode", "pool": "decode", "grpc": "h:1"}]', "events is missing"),
        (raw[:-1] + "," + raw[1:], "listed twice"),
        ("[oops", "not valid JSON"),
        (str(tmp_path / "missing.json"), "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=match):
            static_records(bad)
