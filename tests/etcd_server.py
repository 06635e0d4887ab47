"""A real etcd (Debian's `etcd-server`, installed by `make test`) for the discovery tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trident.etcd_process import EtcdProcess


@contextmanager
def etcd_server(data_dir: Path) -> Iterator[str]:
    """Run etcd until the block ends; yields its client URL."""
    etcd = EtcdProcess(data_dir).start()
    try:
        yield etcd.url
    finally:
        etcd.stop()
