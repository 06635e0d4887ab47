"""Triton's model-repository API over HTTP: load (with config and file overrides), unload.

Called by the launcher (`trident serve` loads the router and creates decode replicas) and
by the planner (adds and removes replicas at run time). The server restricts this API to
requests that carry a key header (`--http-restricted-api=model-repository:<header>=<key>`);
whoever started the server holds the key and passes it here.

A replica (`decode_1`, ...) is created from a template model directory: its config.pbtxt is
parsed into the JSON form Triton accepts as a `config` override, renamed, given an instance
group, and loaded together with a `file:1/model.py` override carrying the template's code.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from trident.core.errors import ModelLoadError, TridentError
from trident.core.names import ADMIN_KEY_HEADER

logger = logging.getLogger(__name__)



class ModelControl:
    """A small blocking client of one server's repository API; safe to share across threads."""

    def __init__(self, http_url: str, key: str = "", key_header: str = ADMIN_KEY_HEADER, timeout_s: float = 30.0) -> None:
        self.base = http_url.rstrip("/")
        if "://" not in self.base:
            self.base = "http://" + self.base
        self.key = key
        self.key_header = key_header
        self.timeout_s = timeout_s

    def load(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Load (or reload) `name`; blocks until the model is ready or failed.

        `config` replaces the repository's config.pbtxt (Triton's JSON model config);
        `files` maps paths relative to the model directory (`1/model.py`) to contents.
        """
        params: dict[str, str] = {}
        if config is not None:
            params["config"] = json.dumps(config)
        for path, data in (files or {}).items():
            params["file:" + path] = base64.b64encode(data).decode("ascii")
        body = {"parameters": params} if params else {}
        status, text = self._post(f"/v2/repository/models/{name}/load", body, timeout_s)
        if status != 200:
            raise ModelLoadError(f"loading model {name!r} failed: {_error_text(text)}")

    def unload(self, name: str, unload_dependents: bool = False, timeout_s: float | None = None) -> None:
        """Ask the server to unload `name` (returns before the model is fully gone)."""
        body = {"parameters": {"unload_dependents": unload_dependents}}
        status, text = self._post(f"/v2/repository/models/{name}/unload", body, timeout_s)
        if status != 200:
            raise TridentError(f"unloading model {name!r} failed: {_error_text(text)}")

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index: `[{"name", "version", "state", "reason"}, ...]`."""
        status, text = self._post("/v2/repository/index", {"ready": ready_only}, None)
        if status != 200:
            raise TridentError(f"repository index failed: {_error_text(text)}")
        return json.loads(text or "[]")

    def is_ready(self, name: str) -> bool:
        status, _ = self._request("GET", f"/v2/models/{name}/ready", None, 5.0)
        return status == 200

    def _post(self, path: str, body: Mapping[str, Any], timeout_s: float | None) -> tuple[int, str]:
        return self._request("POST", path, json.dumps(body).encode(), timeout_s)

    def _request(self, method: str, path: str, data: bytes | None, timeout_s: float | None) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers[self.key_header] = self.key
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as exc:
            raise TridentError(f"{method} {self.base}{path}: {exc}") from exc


def read_model_config(model_dir: str) -> dict[str, Any]:
    """Parse `<model_dir>/config.pbtxt` into Triton's JSON model-config form."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = os.path.join(model_dir, "config.pbtxt")
    try:
        with open(path, encoding="utf-8") as fh:
            message = text_format.Parse(fh.read(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def replica_load_args(
    template_dir: str,
    name: str,
    *,
    gpu: int | None = None,
    parameters: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Config override and files for loading a replica `name` of the model in `template_dir`.

    `gpu` pins the replica's single instance to that GPU (`KIND_GPU gpus:[gpu]`); None keeps
    one CPU instance. `parameters` are added to the config's string parameters.
    """
    config = read_model_config(template_dir)
    config["name"] = name
    if gpu is None:
        config["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    else:
        config["instance_group"] = [{"count": 1, "kind": "KIND_GPU", "gpus": [gpu]}]
    merged = dict(config.get("parameters", {}))
    for key, value in (parameters or {}).items():
        merged[key] = {"string_value": value}
    config["parameters"] = merged
    files: dict[str, bytes] = {}
    version_dir = os.path.join(template_dir, "1")
    for entry in sorted(os.listdir(version_dir)):
        path = os.path.join(version_dir, entry)
        if os.path.isfile(path) and entry.endswith(".py"):
            with open(path, "rb") as fh:
                files["1/" + entry] = fh.read()
    if "1/model.py" not in files:
        raise ModelLoadError(f"template {template_dir} has no 1/model.py")
    return config, files


def load_replica(
    control: ModelControl,
    template_dir: str,
    name: str,
    *,
    gpu: int | None = None,
    parameters: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Load worker `name` of the pool whose template is `template_dir`; blocks until ready.

    The template itself (`name` == the directory's name) loads from the repository, with a
    config override only when it must be pinned to a GPU; a replica gets the template's
    config renamed plus its code as `file:` overrides (`replica_load_args`). The launcher
    and the planner's Triton connector call it.
    """
    if name == os.path.basename(os.path.normpath(template_dir)):
        if gpu is None:
            control.load(name, timeout_s=timeout_s)
        else:
            config, _ = replica_load_args(template_dir, name, gpu=gpu, parameters=parameters)
            control.load(name, config=config, timeout_s=timeout_s)
        return
    config, files = replica_load_args(template_dir, name, gpu=gpu, parameters=parameters)
    control.load(name, config=config, files=files, timeout_s=timeout_s)


def _error_text(text: str) -> str:
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text.strip() or "(no message)"
