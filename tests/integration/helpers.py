"""Small HTTP / metrics / worker-call helpers for the integration tests (the router's gRPC client is
trident.router_client)."""

from __future__ import annotations

import json
import os
import queue
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from trident.router_client import to_array

CHAT_FRANCE = json.dumps([{"role": "user", "content": "What is the capital of France?"}])


def generate(http_url: str, model: str = "router", **body: Any) -> httpx.Response:
    return httpx.post(f"{http_url}/v2/models/{model}/generate", json=body, timeout=120)


def generate_stream(http_url: str, model: str = "router", **body: Any) -> list[dict[str, Any]]:
    """Server-sent events of generate_stream as dicts; an error event raises AssertionError."""
    events = []
    with httpx.stream("POST", f"{http_url}/v2/models/{model}/generate_stream", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[len("data:"):])
                assert "error" not in event, event["error"]
                events.append(event)
    return events


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    """`{worker: value}` of one metric (gauge/counter) on Triton's /metrics."""
    text = httpx.get(metrics_url, timeout=10).text
    out = {}
    for match in re.finditer(rf'^{name}\{{[^}}]*worker="([^"]+)"[^}}]*\}} ([0-9.eE+-]+)$', text, re.M):
        out[match.group(1)] = float(match.group(2))
    return out


def call_worker(grpc_url: str, model: str, **inputs: Any) -> list[dict[str, np.ndarray]]:
    """One request straight to a worker model; raw arrays (the descriptor is binary)."""
    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: results.put(error if error is not None else result))
    try:
        tensors = []
        for name, value in inputs.items():
            array, datatype = to_array(name, value)
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.async_stream_infer(model, tensors, request_id="direct", enable_empty_final_response=True)
        out = []
        while True:
            item = results.get(timeout=120)
            if isinstance(item, Exception):
                raise item
            response = item.get_response()
            if response.outputs:
                out.append({o.name: item.as_numpy(o.name) for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def stub_pid(launcher: Any, model: str) -> int:
    """The pid of the Python-backend stub serving `model` (instance 0) under `launcher`."""
    from trident.launcher import group_pids

    assert launcher._proc is not None
    for pid in group_pids(launcher._proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and f" {model}_0_0 " in cmdline:
            return pid
    raise AssertionError(f"no stub process for {model}")


def orphan_kv_segments() -> list[str]:
    """KV pool segments in /dev/shm whose creating process is dead (leaked by a killed worker)."""
    out = []
    for name in os.listdir("/dev/shm"):
        match = re.fullmatch(r"trident_kv_([0-9]+)_[0-9a-f]{32}", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            out.append(name)
    return out
