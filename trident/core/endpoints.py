"""Where workers publish KV events: one private directory of ipc:// sockets per server.

Workers (`plugins.triton.events`) bind and the router (`router_ensemble.triton.kv_routing`)
connects to `ipc://<dir>/<worker model name>.kv` (plus `<...>.kv-resync` for resync
requests; an engine with its own publisher, vLLM, binds `<...>.kv-engine` and
`<...>.kv-engine-replay`, named in the worker's load reports), so the router finds a worker's stream from its model name alone, and no TCP port
is opened. The directory is, in order:

1. `TRIDENT_KV_EVENTS_DIR` (or a model's `kv_events_dir` parameter): `trident serve` creates a
   fresh 0700 directory per server and exports it to every model;
2. otherwise `<tmp>/trident-kv-<uid>/server-<parent pid>`: Python-backend stubs are children
   of tritonserver, so every model of one plain `tritonserver --model-repository ...` agrees
   on it, and two servers of the same user do not collide. The last worker to stop removes it
   (`release_endpoint`).

Directories are created 0700 and refused when another user owns them or others can write
to them (a socket there could be impersonated).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from trident.core.errors import ConfigError

EVENTS_DIR_ENV = "TRIDENT_KV_EVENTS_DIR"
EVENTS_DIR_PARAM = "kv_events_dir"
SUFFIX = ".kv"
ENGINE_SUFFIX = "-engine"  # <worker>.kv-engine: an engine's own publisher (vLLM)
_MAX_IPC_PATH = 100  # sun_path holds 108 bytes; keep room for "-resync"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SERVER_PREFIX = "server-"  # <default base>/server-<tritonserver pid>


def events_dir(params: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The socket directory for this server (created 0700 if missing)."""
    env = os.environ if env is None else env
    raw = (env.get(EVENTS_DIR_ENV) or "").strip() or ((params or {}).get(EVENTS_DIR_PARAM) or "").strip()
    if raw and not raw.startswith("${"):
        path = Path(raw).expanduser()
        return ensure_private_dir(path, EVENTS_DIR_ENV)
    base = _default_base()
    ensure_private_dir(base, EVENTS_DIR_ENV)
    return ensure_private_dir(base / f"{_SERVER_PREFIX}{os.getppid()}", EVENTS_DIR_ENV)


def _default_base() -> Path:
    return Path(tempfile.gettempdir()) / f"trident-kv-{os.getuid()}"


def ensure_private_dir(path: Path, field: str = EVENTS_DIR_ENV) -> Path:
    """Create `path` (0700) or check that an existing one is ours and not writable by others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot create {str(path)!r}: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{field}: {str(path)!r} is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{field}: {str(path)!r} belongs to another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{field}: {str(path)!r} is writable by other users; use a 0700 directory")
    return path


def check_worker_name(worker: str) -> str:
    """`worker`, or `ConfigError` when it cannot name a file in the run directory."""
    if not _NAME.fullmatch(worker):
        raise ConfigError(f"worker: {worker!r} is not a valid model name")
    return worker


def events_endpoint(worker: str, directory: Path) -> str:
    """`ipc://` address of a worker's KV event stream (its resync socket adds "-resync")."""
    check_worker_name(worker)
    path = str(directory / (worker + SUFFIX))
    if len(path) > _MAX_IPC_PATH:
        raise ConfigError(
            f"{EVENTS_DIR_ENV}: {path!r} is too long for an ipc socket ({len(path)} > {_MAX_IPC_PATH}); "
            "use a shorter directory"
        )
    return "ipc://" + path


def engine_events_endpoint(worker: str, directory: Path) -> str:
    """`ipc://` address where an engine that publishes its own KV events (vLLM) binds them;
    its replay socket adds "-replay"."""
    endpoint = events_endpoint(worker, directory) + ENGINE_SUFFIX
    if len(endpoint) - len("ipc://") + len("-replay") > _MAX_IPC_PATH + len("-resync"):
        raise ConfigError(f"{EVENTS_DIR_ENV}: {endpoint!r} is too long for an ipc socket; use a shorter directory")
    return endpoint


def release_endpoint(endpoint: str) -> None:
    """A worker's publisher has closed (its socket files are gone): remove the per-server
    default directory if that leaves it empty. Directories someone configured are kept."""
    if not endpoint.startswith("ipc://"):
        return
    directory = Path(endpoint[len("ipc://"):]).parent
    if directory.name.startswith(_SERVER_PREFIX) and directory.parent.name == _default_base().name:
        with contextlib.suppress(OSError):  # not empty: another worker still publishes there
            directory.rmdir()
