"""The cluster's shared secret, and the keys derived from it.

Every process of a multi-node deployment reads the same secret: from the file named by
`TRIDENT_KV_SECRET_FILE` (a Kubernetes Secret mounted as a file), else `TRIDENT_KV_SECRET`;
never from argv. It authenticates peers across nodes:

- NIXL pool handles carry an HMAC of their fields (`kv_manager.transfer.nixl`);
- worker records in etcd carry an HMAC (`trident.core.discovery`);
- KV event streams over TCP use ZMQ CURVE with keypairs derived from it (`curve_keys`): the
  publisher accepts only subscribers that hold the client key, and subscribers only a
  publisher that holds the server key, so the stream is authenticated and encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from trident.core.errors import ConfigError

SECRET_ENV = "TRIDENT_KV_SECRET"
SECRET_FILE_ENV = "TRIDENT_KV_SECRET_FILE"
_MIN_SECRET = 16  # bytes


def load_secret(env: Mapping[str, str] | None = None) -> bytes | None:
    """The secret from `TRIDENT_KV_SECRET_FILE` (a file) or `TRIDENT_KV_SECRET`; None when
    neither is set. A secret shorter than 16 bytes is a `ConfigError`."""
    env = os.environ if env is None else env
    path = (env.get(SECRET_FILE_ENV) or "").strip()
    if path:
        try:
            value = Path(path).expanduser().read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{SECRET_FILE_ENV}: cannot read {path!r}: {exc}") from None
        source = SECRET_FILE_ENV
    else:
        value = (env.get(SECRET_ENV) or "").strip().encode()
        source = SECRET_ENV
        if not value:
            return None
    if len(value) < _MIN_SECRET:
        raise ConfigError(f"{source}: the cluster secret must be at least {_MIN_SECRET} bytes")
    return value


def require_secret(what: str, env: Mapping[str, str] | None = None) -> bytes:
    secret = load_secret(env)
    if secret is None:
        raise ConfigError(f"{SECRET_FILE_ENV}: {what} needs the cluster secret ({SECRET_FILE_ENV} or {SECRET_ENV})")
    return secret


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """Z85 CURVE keypairs of the KV event streams (server: publishers, client: routers)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` (PUB, ROUTER) a CURVE server with the cluster's server key."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def connect_as_client(self, sock: zmq.Socket) -> None:
        """Make `sock` (SUB, DEALER) a CURVE client of the cluster's publishers; before connect."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


def curve_keys(secret: bytes) -> CurveKeys:
    if not zmq.has("curve"):
        raise ConfigError("this pyzmq/libzmq has no CURVE support: cross-node KV events cannot be secured")

    def pair(label: bytes) -> tuple[bytes, bytes]:
        raw = hmac.new(secret, b"trident-kv-events-" + label, hashlib.sha256).digest()
        private = z85.encode(raw)
        return zmq.curve_public(private), private

    server_public, server_secret = pair(b"server")
    client_public, client_secret = pair(b"client")
    return CurveKeys(server_public, server_secret, client_public, client_secret)
