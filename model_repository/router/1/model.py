"""Router model: thin glue over `router_ensemble.triton.model.RouterModel`.

Decoupled BLS entry point: tokenizes, picks a decode worker, streams its tokens back as
text deltas. The I/O contract is in `trident/core/router_io.py`.
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
        from router_ensemble.triton.model import RouterModel
        from trident.core.triton_io import model_parameters, setup_logging

        setup_logging(args["model_name"])
        self.router = RouterModel(args["model_name"], model_parameters(json.loads(args["model_config"])))

    def execute(self, requests: list) -> None:
        self.router.execute(requests)

    def finalize(self) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            router.finalize()
