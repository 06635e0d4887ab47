"""Headless Debian chromium driven over the DevTools protocol, for the console's browser test.

`Browser.start(tmp_dir)` launches `chromium --headless` with its own profile in `tmp_dir`,
reads the DevTools port chromium writes there, and opens one page (`Browser.page`). Calls
are synchronous (`websockets.sync`), on the test's thread; events that arrive while waiting
for a reply are kept in `events`.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--remote-debugging-port=0",
)


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], ws: ClientConnection) -> None:
        self.proc = proc
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self.session = ""

    @classmethod
    def start(cls, tmp_dir: Path, timeout_s: float = 60.0) -> Browser:
        binary = shutil.which("chromium")
        if binary is None:
            pytest.fail("chromium not found: `make setup-chromium` (apt-get install chromium)")
        profile = tmp_dir / "chromium-profile"
        profile.mkdir()
        log = (tmp_dir / "chromium.log").open("wb")
        proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"chromium did not start; see {tmp_dir / 'chromium.log'}")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20, legacy=True)
        browser = cls(proc, ws)
        target = browser.call("Target.createTarget", url="about:blank", session=False)["targetId"]
        attached = browser.call(
            "Target.attachToTarget", targetId=target, flatten=True, session=False
        )
        browser.session = attached["sessionId"]
        return browser

    def call(
        self, method: str, session: bool = True, timeout_s: float = 30.0, **params: Any
    ) -> dict[str, Any]:
        """Send one command (to the page's session unless `session=False`) and wait for its reply."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(
        self, expression: str, timeout_s: float, interval_s: float = 0.1, describe: str = ""
    ) -> Any:
        """Poll `expression` until it is truthy; return its value (fail the test on timeout,
        with the value of `describe` and the page's errors)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval_s)
        self.drain_events()
        seen = self.evaluate(describe) if describe else None
        pytest.fail(
            f"timed out after {timeout_s:.0f}s waiting for {expression}: {seen} {self.errors()}"
        )

    def drain_events(self, seconds: float = 0.2) -> None:
        """Collect the events that arrive within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                break

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append("log: " + params["entry"]["text"] + " " + params["entry"].get("url", ""))
        return out

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Safe to call twice."""
        try:
            self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
