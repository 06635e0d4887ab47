"""Router model: thin glue over `router_ensemble.triton.model.RouterModel`.

Decoupled BLS entry point: tokenizes, picks workers, streams their tokens back as text
deltas. The I/O contract is `trident.core.contract.ROUTER_INPUTS` / `ROUTER_OUTPUTS`.
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
        from router_ensemble.triton.model import RouterModel
        from trident.core.settings import model_parameters
        from trident.core.triton_io import setup_logging

        setup_logging(pb_utils, args["model_name"])
        params = model_parameters(json.loads(args["model_config"]))
        self.router = RouterModel(pb_utils, args["model_name"], params)

    def execute(self, requests: list) -> None:
        self.router.execute(requests)

    def finalize(self) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            router.finalize()
