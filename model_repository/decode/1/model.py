"""Decode worker model: thin glue over `plugins.triton.model.WorkerModel`.

A decode worker streams tokens; given a `kv_descriptor` it first pulls the prompt's KV from
the prefill worker that computed it. The I/O contract is `trident.core.contract.WORKER_*`.
"""

from __future__ import annotations

import json
import os
import sys

import triton_python_backend_utils as pb_utils


def _add_trident_root(args: dict) -> None:
    """Replicas loaded with a `file:1/model.py` override run from a temporary directory:
    find the checkout from the `trident_root` parameter, `TRIDENT_ROOT`, or this file."""
    params = json.loads(args["model_config"]).get("parameters", {})
    root = params.get("trident_root", {}).get("string_value", "") or os.environ.get("TRIDENT_ROOT", "")
    root = root or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    if root not in sys.path:
        sys.path.insert(0, root)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _add_trident_root(args)
        from plugins.triton.model import worker_from_args

        self.worker = worker_from_args(pb_utils, args)

    def execute(self, requests: list) -> None:
        self.worker.execute(requests)

    def finalize(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()
