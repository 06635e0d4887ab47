"""The `router` model's body: Triton requests in, `Orchestrator` runs, Triton responses out.

`model_repository/router/1/model.py` creates one `RouterModel` per instance. `execute` runs
on Triton's model thread and only hands each request to a thread pool, so one router
instance serves many requests at once (the orchestration blocks on BLS streams); each pool
thread owns its request until the COMPLETE_FINAL response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from router_ensemble.orchestration.disagg import build_disaggregator
from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.text.tokenizer import load_tokenizer
from router_ensemble.triton.bls_client import BlsWorkerClient, is_model_ready, release_retired
from router_ensemble.triton.kv_routing import KvRouting
from trident.core.errors import ConfigError, TridentError
from trident.core.router_io import (
    ROUTER_INPUTS,
    RouterDelta,
    check_parameters,
    encode_router_outputs,
    parse_router_inputs,
)
from trident.core.settings import load_settings
from trident.core.triton_io import (
    close_quietly,
    pb_utils,
    read_inputs,
    send_final_error,
    tensors,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterModelConfig:
    """The router model's own parameters (routing policy settings: `routing_config.py`).

    `model` also reads `TRIDENT_MODEL` (the engines' key); the others `TRIDENT_ROUTER_<KEY>`.
    """

    model: str = ""  # tokenizer source; "" = the default model
    decode_pool: str = "decode"  # worker models are <pool>, <pool>_1, <pool>_2, ...
    decode_models: str = ""  # fixed comma-separated list instead of discovery
    max_concurrency: int = 256  # request threads per router instance
    cancel_poll_ms: int = 100

    def validate(self) -> RouterModelConfig:
        if self.max_concurrency <= 0 or self.cancel_poll_ms <= 0:
            raise ConfigError("max_concurrency and cancel_poll_ms must be positive")
        return self

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> RouterModelConfig:
        return load_settings(cls, params, env, env_key=_env_key)


def _env_key(key: str) -> str:
    return "TRIDENT_MODEL" if key == "model" else "TRIDENT_ROUTER_" + key.upper()


class RouterModel:
    """One router model instance. Created in `initialize`; `execute` from Triton's thread."""

    def __init__(self, name: str, params: Mapping[str, str]) -> None:
        self.name = name
        self.config = RouterModelConfig.from_mapping(params)
        fixed = tuple(m.strip() for m in self.config.decode_models.split(",") if m.strip())
        directory = WorkerDirectory(self.config.decode_pool, probe=is_model_ready, fixed=fixed)
        self.routing = KvRouting.from_params(directory, params, metrics_name=name).start()
        self.orchestrator = Orchestrator(
            load_tokenizer(self.config.model),
            self.routing.selector,
            self.routing.watch(BlsWorkerClient()),
            cancel_poll_s=self.config.cancel_poll_ms / 1000.0,
            disagg=build_disaggregator(params, is_model_ready, BlsWorkerClient()),
        )
        self.pool = ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix=f"{name}-req")
        logger.info("router %s ready (tokenizer %s)", name, self.orchestrator.tokenizer.model_id)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.pool.submit(self._serve, request, request.get_response_sender())

    def _serve(self, request: Any, sender: Any) -> None:
        pb = pb_utils()

        def emit(delta: RouterDelta) -> None:
            response = pb.InferenceResponse(output_tensors=tensors(encode_router_outputs(delta)))
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if delta.final else 0)

        try:
            check_parameters(json.loads(request.parameters() or "{}"))
            parsed = parse_router_inputs(read_inputs(request, ROUTER_INPUTS))
            self.orchestrator.run(parsed, emit, request.is_cancelled)
        except TridentError as exc:
            logger.info("request failed: %s", exc)
            self._send_error(sender, exc)
        except Exception as exc:
            if _cancelled(request):
                logger.info("request ended after the client cancelled it: %s", exc)
                close_quietly(sender)
            else:
                logger.exception("router %s: unexpected error", self.name)
                self._send_error(sender, f"internal error in router {self.name}: {exc}")
        self.routing.after_request()  # the final response is out: routing metrics to the server

    @staticmethod
    def _send_error(sender: Any, exc: BaseException | str) -> None:
        try:
            send_final_error(sender, exc)
        except Exception as send_exc:  # the client is gone
            logger.info("could not deliver error %r: %s", str(exc), send_exc)

    def finalize(self) -> None:
        logger.debug("router %s: finalize", self.name)
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.routing.close()
        release_retired()
        logger.debug("router %s: finalized", self.name)


def _cancelled(request: Any) -> bool:
    try:
        return bool(request.is_cancelled())
    except Exception:
        return True
