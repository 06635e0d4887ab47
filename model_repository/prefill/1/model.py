"""Prefill worker model: the decode glue (`trident.worker.model.DecodeWorker`) on a shareable KV pool.

The router sends `hold_kv` requests here (router_ensemble/orchestration/disagg.py); the engine returns the
first token and a KV descriptor, and keeps the prompt's blocks leased for a decode worker.

Replicas loaded with a `file:1/model.py` override run this file from a temporary directory,
so the repository root comes from the `trident_root` parameter or `TRIDENT_ROOT` first.
"""

from __future__ import annotations

import json
import os
import sys


def _add_trident_root(args: dict) -> None:
    params = json.loads(args["model_config"]).get("parameters", {})
    root = params.get("trident_root", {}).get("string_value", "") or os.environ.get("TRIDENT_ROOT", "")
    if not root:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if root not in sys.path:
        sys.path.insert(0, root)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _add_trident_root(args)
        from trident.worker.model import worker_from_args

        self.worker = worker_from_args(args)

    def execute(self, requests: list) -> None:
        self.worker.execute(requests)

    def finalize(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()
