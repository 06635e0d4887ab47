"""Restart a model whose Python-backend stub died while the server runs.

Triton 2.51 does not restart the stub of a decoupled model that was killed (OOM killer,
a crash in native code, an operator's `kill`): every later request to the model fails with
"Stub process '<model>_0_0' is not healthy" until the model is loaded again, and a plain
`load` of an unchanged model is a no-op. So the `Launcher` runs a `StubSupervisor`: every
`poll_s` it lists the stub processes of the server's process group; a model that had a
stub and has none for two polls in a row, while Triton still reports it READY, is unloaded
and loaded again (`reload`: the launcher's own configuration for that model). A model
unloaded on purpose (the planner scaling down) is no longer READY and is forgotten.
(Triton's repository index does not list replicas loaded with a config override, so
readiness is asked per model.)

Requests in flight on the dead stub are not answered by Triton (not even after the
reload); a worker's are migrated by the router, a router's are ended by the OpenAI frontend's
`frontend.router_watch` (direct Triton clients need a timeout).

Threads: one daemon thread ("stub-supervisor"), started by `start()`, ended by `stop()`.
`restarts` counts restarts per model (read by tests and benchmarks).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from trident.model_control import ModelControl

logger = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


def stub_models(pids: set[int]) -> dict[str, int]:
    """`{model: pid}` of the Python-backend stubs among `pids` (instance 0 of each model:
    a stub's command line names its instance `<model>_<group>_<index>`)."""
    out: dict[str, int] = {}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(STUB_NAME.encode()):
            continue
        for arg in argv[1:]:
            name = arg.decode(errors="replace")
            if name.endswith("_0_0"):
                out[name[: -len("_0_0")]] = pid
                break
    return out


class StubSupervisor:
    """Watches one server's stubs; see the module docstring."""

    def __init__(
        self,
        control: ModelControl,
        pids: Callable[[], set[int]],
        reload: Callable[[str], None],
        poll_s: float = 1.0,
    ) -> None:
        self.control = control
        self.pids = pids  # the server's process group now
        self.reload = reload
        self.poll_s = poll_s
        self.restarts: Counter[str] = Counter()
        self._seen: set[str] = set()  # models that had a live stub
        self._missing: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._seen = set(stub_models(self.pids()))  # every model is loaded by now
        self._thread = threading.Thread(target=self._run, name="stub-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # the server may be stopping; try again next time
                logger.debug("stub check failed: %s", exc)

    def check(self) -> list[str]:
        """One poll; returns the models restarted."""
        alive = stub_models(self.pids())
        self._seen |= set(alive)
        restarted = []
        for model in sorted(self._seen - set(alive)):
            self._missing[model] += 1
            if self._missing[model] < 2 or self._stop.is_set():
                continue  # a stub being replaced by a load in progress
            if not self.control.is_ready(model):  # unloaded on purpose (or being loaded)
                self._seen.discard(model)
                continue
            logger.warning("model %s: its stub process died; loading it again", model)
            try:
                self.control.unload(model)
                self.reload(model)
            except Exception as exc:
                logger.error("model %s: restart failed: %s", model, exc)
                continue
            self.restarts[model] += 1
            self._missing.pop(model, None)
            restarted.append(model)
        for model in set(alive):
            self._missing.pop(model, None)
        return restarted
