"""A local etcd member (Debian's `etcd-server`) for the one-command cluster demo and the tests:
one member on free loopback ports, its data in a directory of the caller's. Production runs
its own etcd cluster; Trident only talks to it (`trident.core.discovery`)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from trident.core.errors import ConfigError
from trident.launcher import free_port


class EtcdProcess:
    """`start()` runs etcd and waits for /health; `stop()` ends it (safe to call twice)."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.url = f"http://{host}:{free_port(host)}"
        self._peer = f"http://{host}:{free_port(host)}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> EtcdProcess:
        binary = shutil.which("etcd")
        if binary is None:
            raise ConfigError("etcd: not installed (Debian: apt-get install etcd-server; `make setup-etcd`)")
        self._proc = subprocess.Popen(
            [binary, "--name", "trident", "--data-dir", str(self.data_dir), "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", self._peer,
             "--initial-advertise-peer-urls", self._peer, "--initial-cluster", f"trident={self._peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(f"etcd exited with code {self._proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise ConfigError(f"etcd did not become healthy in {timeout_s:.0f} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
