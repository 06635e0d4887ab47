"""Find, prepare, start and stop `tritonserver` on Trident's model repository.

`trident serve` and the integration tests call `Launcher(config).start()` from the main
thread, then `stop()` (also on SIGINT/SIGTERM). The launcher:

1. locates `tritonserver`: `--tritonserver` / `TRIDENT_TRITONSERVER`, then `PATH` and
   NGC's `/opt/tritonserver/bin`, then the `nvidia-pytriton` wheel;
2. for the wheel, prepares a backend directory in `~/.cache/trident` holding the Python
   backend and the stub built for the running Python, and puts the wheel's
   `nvidia_pytriton.libs` on `LD_LIBRARY_PATH`;
3. starts the server in its own process group, explicit model control, bound to
   `config.host`, the model-repository API restricted by a random key that only this
   launcher holds, and python-backend shared memory under a prefix unique to this launcher;
4. loads `decode`, the replicas `decode_1..N-1` (config + `file:1/model.py` overrides), the
   same for `prefill` (`--prefill M`: `prefill`, `prefill_1..M-1`), and `router`, reporting
   progress while the engines start;
5. on stop: SIGTERM, a grace period, SIGKILL to the whole process group (stubs included),
   then removes its own `triton_python_backend_shm_region_*` files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from trident.core.endpoints import EVENTS_DIR_ENV
from trident.core.errors import ConfigError, ModelLoadError, TridentError
from trident.core.names import ADMIN_KEY_HEADER, replica_names
from trident.model_control import ModelControl, load_replica
from trident.serve_config import ServeConfig
from trident.supervisor import StubSupervisor

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"
ENGINE_SHM_PREFIX = "trident_kv_"  # kv_manager.transfer: /dev/shm/trident_kv_<pid>_<random>

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """Where a runnable tritonserver and its Python backend are."""

    binary: Path
    backend_dir: Path
    lib_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a started server listens."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def locate_tritonserver(explicit: str = "", env: dict[str, str] | None = None) -> Path:
    """Path of the tritonserver binary, or `ConfigError` saying where we looked."""
    env = dict(os.environ) if env is None else env
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / "tritonserver"
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"tritonserver: {explicit!r} is not an executable file")
        return path.resolve()
    found = shutil.which("tritonserver", path=env.get("PATH", ""))
    if found:
        return Path(found).resolve()
    if NGC_BINARY.is_file():
        return NGC_BINARY
    wheel = _wheel_binary()
    if wheel is not None:
        return wheel
    raise ConfigError(
        "tritonserver not found: pass --tritonserver or set TRIDENT_TRITONSERVER, put it on PATH "
        "(NGC: /opt/tritonserver/bin), or `pip install nvidia-pytriton`"
    )


def _wheel_binary() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "tritonserver" / "bin" / "tritonserver"
        if binary.is_file():
            return binary.resolve()
    return None


def prepare_install(binary: Path, cache_dir: Path | None = None) -> TritonInstall:
    """Backend directory and library path for `binary`.

    A server whose `backends/python` already holds a stub (NGC) is used as is. A wheel
    layout (`python_backend_stubs/X.Y/`) gets a backend directory under `cache_dir` with the
    Python backend and the stub for this interpreter, so the wheel itself is never modified.
    """
    root = binary.parent.parent
    backends = root / "backends"
    candidates = (root.parent.parent / "nvidia_pytriton.libs", root.parent / "nvidia_pytriton.libs", root / "lib")
    libs = tuple(p for p in candidates if p.is_dir())
    if (backends / "python" / STUB_NAME).is_file():
        return TritonInstall(binary, backends, libs)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ConfigError(f"{binary}: no Python backend stub for Python {version} (looked for {stub})")
    cache_dir = cache_dir or default_cache_dir()
    stamp = f"{int(stub.stat().st_mtime)}-{stub.stat().st_size}"
    target = cache_dir / "tritonserver-backends" / f"py{version}-{stamp}"
    if not (target / "python" / STUB_NAME).is_file():
        _build_backend_dir(backends, stub, target)
    return TritonInstall(binary, target, _interpreter_lib_dir() + libs)


def _interpreter_lib_dir() -> tuple[Path, ...]:
    """The directory of this interpreter's libpython, when it has a shared one.

    The wheel's stub links `libpython3.X.so.1.0` by name; found elsewhere first (the system's
    Python of the same minor version), it embeds a different patch release than the venv's,
    and C extensions of our interpreter's stdlib (`_ssl`, which vLLM's imports load) fail
    on symbols that release lacks.
    """
    import sysconfig

    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and name and (Path(libdir) / name).is_file():
        return (Path(libdir),)
    return ()


def _build_backend_dir(backends: Path, stub: Path, target: Path) -> None:
    """Copy the wheel's backends plus the stub into a temp dir, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    shutil.copytree(backends, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, tmp / "python" / STUB_NAME)
    try:
        tmp.rename(target)
    except OSError:  # another launcher won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared Python backend for %s in %s", sys.version.split()[0], target)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trident"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def remove_shm_regions(prefix: str) -> list[str]:
    """Delete /dev/shm files whose name starts with `prefix`; return their names."""
    removed = []
    for path in SHM_DIR.glob(prefix + "*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def group_pids(pgid: int) -> set[int]:
    """Processes in process group `pgid` (Linux /proc; empty elsewhere)."""
    pids: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(int(stat.parent.name))
    return pids


def gpu_count() -> int:
    """Number of GPUs `nvidia-smi -L` lists (1 if it cannot tell)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")))


class Launcher:
    """Owns one tritonserver process and the models it loads. Not thread-safe; main thread."""

    def __init__(self, config: ServeConfig, progress: Progress | None = None) -> None:
        self.config = config.validate()
        self.progress = progress or logger.info
        self.key = secrets.token_urlsafe(24)
        self.shm_prefix = f"{SHM_PREFIX}trident{os.getpid()}x{secrets.token_hex(3)}_"
        self.repository = Path(config.model_repository or REPO_ROOT / "model_repository").resolve()
        self.endpoints: Endpoints | None = None
        self.control: ModelControl | None = None
        self.log_path: Path | None = None
        self.decode_models: list[str] = []
        self.prefill_models: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self.kv_events_dir: Path | None = None  # the workers' KV event sockets (trident.core.endpoints)
        self.supervisor: StubSupervisor | None = None  # restarts models whose stub died

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> Endpoints:
        """Start the server and load every model; raise (after cleaning up) on failure."""
        try:
            self._spawn()
            self._wait_live()
            self._load_models()
            if self.config.restart_stubs:
                self._supervise()
        except BaseException:
            self.stop()
            raise
        return self.endpoints  # type: ignore[return-value]

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server and its stubs; remove its shared memory. Safe to call twice."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                self.progress("stopping tritonserver ...")
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver did not exit in %.0fs; killing it", grace_s)
            stubs = group_pids(proc.pid)
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            # Engines name their shared KV pools after their process; after a forced exit
            # nobody else would remove those of our stubs.
            for pid in stubs | {proc.pid}:
                remove_shm_regions(f"{ENGINE_SHM_PREFIX}{pid}_")
        removed = remove_shm_regions(self.shm_prefix)
        if removed:
            logger.info("removed %d leftover shared-memory regions", len(removed))
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.kv_events_dir is not None:
            shutil.rmtree(self.kv_events_dir, ignore_errors=True)
            self.kv_events_dir = None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits by itself; return its exit code."""
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- steps -----------------------------------------------------------------------
    def _spawn(self) -> None:
        cfg = self.config
        install = prepare_install(locate_tritonserver(cfg.tritonserver))
        ports = [p or free_port(cfg.host) for p in (cfg.http_port, cfg.grpc_port, cfg.metrics_port)]
        self.endpoints = Endpoints(cfg.host, *ports)
        self.control = ModelControl(self.endpoints.http_url, self.key, timeout_s=cfg.startup_timeout_s)
        cmd = self.command(install, self.endpoints)
        env = self.environment(install)
        stdout = self._open_log()
        logger.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_parent_death_signal(),
        )
        self.progress(f"started tritonserver (pid {self._proc.pid}, {install.binary})")

    def command(self, install: TritonInstall, ep: Endpoints) -> list[str]:
        restricted = f"model-repository:{ADMIN_KEY_HEADER}={self.key}"
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={install.backend_dir}",
            f"--http-address={ep.host}", f"--http-port={ep.http_port}",
            f"--grpc-address={ep.host}", f"--grpc-port={ep.grpc_port}",
            f"--metrics-address={ep.host}", f"--metrics-port={ep.metrics_port}",
            "--allow-metrics=true",
            f"--allow-gpu-metrics={'true' if self.config.device.startswith('cuda') else 'false'}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-timeout-secs=10",
        ]
        level = self.config.log_level
        if level == "debug":
            cmd.append("--log-verbose=1")
        cmd.append(f"--log-info={'true' if level in ('debug', 'info') else 'false'}")
        cmd.append(f"--log-warning={'false' if level == 'error' else 'true'}")
        return cmd

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.engine_env())
        if self.config.node_name and self.endpoints is not None:  # where other nodes reach its workers
            env["TRIDENT_NODE_GRPC"] = f"{self.config.node_address}:{self.endpoints.grpc_port}"
        env["TRIDENT_ROOT"] = str(REPO_ROOT)
        if not env.get(EVENTS_DIR_ENV, "").strip():  # else the user chose one
            if self.kv_events_dir is None:  # private (0700) and removed in stop()
                self.kv_events_dir = Path(tempfile.mkdtemp(prefix="trident-kv-"))
            env[EVENTS_DIR_ENV] = str(self.kv_events_dir)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        libs = [str(p) for p in install.lib_dirs]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
        # The stub embeds Python; with our interpreter first on PATH it finds this venv.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _open_log(self) -> int | object | None:
        if self.config.server_log == "-":
            return None
        if self.config.server_log:
            self.log_path = Path(self.config.server_log).expanduser().resolve()
        else:
            run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"trident-{os.getpid()}"
            self.log_path = run_dir / f"tritonserver-{self.endpoints.http_port}.log"  # type: ignore[union-attr]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        return self._log_file

    def _wait_live(self) -> None:
        assert self.endpoints is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = self.endpoints.http_url + "/v2/health/live"
        while time.monotonic() < deadline:
            self._check_alive("while starting")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TridentError(f"tritonserver not live after {self.config.startup_timeout_s:.0f}s{self._log_hint()}")

    def _load_models(self) -> None:
        """Load decode and prefill workers and the router in parallel, reporting progress."""
        cfg = self.config
        names = replica_names("decode", cfg.decode)
        prefills = replica_names("prefill", cfg.prefill)
        cuda = cfg.device.startswith("cuda")
        gpus = gpu_count() if cuda else 0
        jobs: dict[str, Callable[[], None]] = {}
        for i, name in enumerate(names):
            jobs[name] = self._load_job(name, gpu=(i % gpus) if cuda else None)
        for i, name in enumerate(prefills):  # after the decode workers on the GPUs
            gpu = ((len(names) + i) % gpus) if cuda else None
            jobs[name] = self._load_job(name, gpu=gpu, pool="prefill")
        if cfg.role != "worker":  # a worker node serves other nodes' routers only
            jobs["router"] = lambda: self.control.load("router")  # type: ignore[union-attr]
        self.decode_models = names
        self.prefill_models = prefills
        self._run_jobs(jobs)

    def _supervise(self) -> None:
        assert self.control is not None and self._proc is not None
        pgid = self._proc.pid
        self.supervisor = StubSupervisor(self.control, lambda: group_pids(pgid), self.reload_model)
        self.supervisor.start()

    def reload_model(self, name: str) -> None:
        """Load `name` (the router, or a worker) again as it was loaded at start."""
        if name == "router":
            assert self.control is not None
            self.control.load("router")
        else:
            self.reload_worker(name)

    def reload_worker(self, name: str) -> None:
        """Load worker model `name` (one of this server's, or a replica the planner added) again
        from its pool's template, as at start; blocks until it is ready."""
        pool = "prefill" if name == "prefill" or name.startswith("prefill_") else "decode"
        if name != pool and not name.startswith(pool + "_"):
            raise ValueError(f"{name!r} is not a worker model (decode, decode_N, prefill, prefill_N)")
        names = [*self.decode_models, *self.prefill_models]
        gpus = gpu_count() if self.config.device.startswith("cuda") else 0
        gpu = (names.index(name) if name in names else len(names)) % gpus if gpus else None
        self._load_job(name, gpu=gpu, pool=pool)()

    def _load_job(self, name: str, gpu: int | None, pool: str = "decode") -> Callable[[], None]:
        template = str(self.repository / pool)
        control = self.control
        assert control is not None
        params = {"trident_root": str(REPO_ROOT)}
        return lambda: load_replica(control, template, name, gpu=gpu, parameters=params)

    def _run_jobs(self, jobs: dict[str, Callable[[], None]]) -> None:
        errors: dict[str, BaseException] = {}
        pending = set(jobs)
        lock = threading.Lock()

        def runner(name: str, job: Callable[[], None]) -> None:
            try:
                job()
            except Exception as exc:  # reported below with the server log
                errors[name] = exc
            with lock:
                pending.discard(name)

        threads = [threading.Thread(target=runner, args=item, daemon=True, name=f"load-{item[0]}") for item in jobs.items()]
        for t in threads:
            t.start()
        start = time.monotonic()
        last_report = start
        self.progress(f"loading {', '.join(jobs)} ...")
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            self._check_alive("while loading models")
            now = time.monotonic()
            if now - start > self.config.startup_timeout_s:
                raise TridentError(f"models not ready after {self.config.startup_timeout_s:.0f}s: {sorted(pending)}")
            if now - last_report >= 5.0:
                with lock:
                    waiting = ", ".join(sorted(pending))
                self.progress(f"  still loading {waiting} ({now - start:.0f}s)")
                last_report = now
        if errors:
            detail = "; ".join(f"{name}: {exc}" for name, exc in sorted(errors.items()))
            raise ModelLoadError(detail + self._log_hint())
        self.progress(f"models ready in {time.monotonic() - start:.1f}s")

    def _check_alive(self, when: str) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise TridentError(f"tritonserver exited (code {code}) {when}{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()[-25:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(lines)

    def with_ports(self) -> ServeConfig:
        """The config with the ports actually bound (after start)."""
        assert self.endpoints is not None
        ep = self.endpoints
        return replace(self.config, http_port=ep.http_port, grpc_port=ep.grpc_port, metrics_port=ep.metrics_port)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the server's group (stubs) and wait until it is empty."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    logger.warning("processes of group %d still present after SIGKILL", pgid)


def _parent_death_signal() -> Callable[[], None] | None:
    """In the child: get SIGTERM when the launcher dies (Linux; main thread only)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None

    def set_pdeathsig() -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_pdeathsig
