"""The `router` model's body: Triton requests in, `Orchestrator` runs, Triton responses out.

`model_repository/router/1/model.py` creates one `RouterModel` per instance, passing in the
stub's `triton_python_backend_utils` as `pb`. `execute` runs on Triton's model thread and
only hands each request to a thread pool, so one router instance serves many requests at
once (the orchestration blocks on BLS streams); each pool thread owns its request until the
COMPLETE_FINAL response, then flushes the routing metrics.

Every Triton workaround of the router lives in this subpackage: no `pb` call from a thread
of our own (`kv_routing`), BLS iterators released on request threads (`bls_client`), streams
from a dead stub ended by a watch (`watched_client`), first-request logging (`disagg`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from router_ensemble.orchestration.disagg import DisaggConfig, Disaggregator
from router_ensemble.orchestration.migration import Migration, MigrationConfig
from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.text.tokenizer import load_tokenizer
from router_ensemble.triton.bls_client import BlsWorkerClient, release_retired
from router_ensemble.triton.grpc_client import GrpcWorkerClient
from router_ensemble.triton.kv_routing import PoolRouting
from router_ensemble.triton.metrics_exporter import RoutingMetricsExporter
from router_ensemble.triton.remote import NodeRoutedClient, RemoteWorkers
from trident.core import tracing
from trident.core.draining import DrainMarkers
from trident.core.endpoints import events_dir
from trident.core.errors import ConfigError, TridentError
from trident.core.node import NodeConfig
from trident.core.router_io import (
    ROUTER_INPUTS,
    RouterDelta,
    check_parameters,
    encode_router_outputs,
    is_probe,
    parse_router_inputs,
    probe_answer,
)
from trident.core.settings import load_settings
from trident.core.triton_io import close_quietly, read_inputs, response, send_final_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterModelConfig:
    """The router model's own parameters.

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

    @property
    def fixed_models(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.decode_models.split(",") if m.strip())


def _env_key(key: str) -> str:
    return "TRIDENT_MODEL" if key == "model" else "TRIDENT_ROUTER_" + key.upper()


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Everything the router model reads from its parameters and the environment, parsed once:
    its own keys, the routing policy (`RoutingConfig`, both pools), disaggregation, request
    migration and the node."""

    model: RouterModelConfig
    routing: RoutingConfig
    disagg: DisaggConfig
    migration: MigrationConfig
    node: NodeConfig

    @classmethod
    def from_params(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> RouterSettings:
        return cls(
            load_settings(RouterModelConfig, params, env, env_key=_env_key),
            RoutingConfig.from_mapping(params, env),
            DisaggConfig.from_mapping(params, env),
            MigrationConfig.from_mapping(params, env),
            NodeConfig.from_mapping(params, env),
        )


class RouterModel:
    """One router model instance. Created in `initialize`; `execute` from Triton's thread."""

    def __init__(self, pb: Any, name: str, params: Mapping[str, str]) -> None:
        self.pb = pb
        self.name = name
        self.settings = settings = RouterSettings.from_params(params)
        tracing.configure(f"trident-{name}")  # on only with an OTLP endpoint in the environment
        bls = BlsWorkerClient(pb)
        client: Any = bls
        socket_dir = events_dir(params)
        draining = DrainMarkers(socket_dir)  # the planner marks workers it is about to remove
        # workers on other nodes: registered in etcd, or a static list
        self.remote = RemoteWorkers(settings.node) if settings.node.remote else None
        self.grpc: GrpcWorkerClient | None = None
        if self.remote is not None:
            self.grpc = GrpcWorkerClient(resolve=self.remote.where)
            client = NodeRoutedClient(bls, self.grpc)

        def remote_of(pool: str) -> Callable[[], list[str]] | None:
            remote = self.remote
            return None if remote is None else (lambda: remote.pool_workers(pool))

        decode_dir = WorkerDirectory(
            settings.model.decode_pool, probe=bls.is_model_ready, fixed=settings.model.fixed_models, draining=draining,
            remote=remote_of(settings.model.decode_pool),
        )
        fixed_prefill = settings.disagg.fixed_models
        prefill_dir = WorkerDirectory(
            settings.disagg.prefill_pool, probe=None if fixed_prefill else bls.is_model_ready, fixed=fixed_prefill,
            draining=draining, remote=remote_of(settings.disagg.prefill_pool),
        )
        self.pools = {
            "decode": PoolRouting(decode_dir, settings.routing, socket_dir, remote=self.remote),
            "prefill": PoolRouting(prefill_dir, settings.routing, socket_dir, remote=self.remote),
        }
        migration = Migration(settings.migration)
        self.exporter = RoutingMetricsExporter(
            pb, name, {p: r.router for p, r in self.pools.items()}, migrations=migration.counts
        )
        for pool, routing in self.pools.items():
            routing.selector.on_decision = self.exporter.observer(pool)
            routing.start()
        decode, prefill = self.pools["decode"], self.pools["prefill"]
        self.orchestrator = Orchestrator(
            load_tokenizer(settings.model.model),
            decode.selector,
            decode.watch(client),
            cancel_poll_s=settings.model.cancel_poll_ms / 1000.0,
            disagg=Disaggregator(settings.disagg, prefill.selector, prefill.watch(client)),
            migration=migration,
        )
        self.pool = ThreadPoolExecutor(
            max_workers=settings.model.max_concurrency, thread_name_prefix=f"{name}-req"
        )
        self._flush_lock = threading.Lock()
        # Told apart by probers (the OpenAI frontend): a new id means a new stub, so streams
        # opened on the old one will never be answered.
        self.instance_id = f"{name}:{os.getpid()}:{secrets.token_hex(4)}"
        logger.info("router %s ready (tokenizer %s)", name, self.orchestrator.tokenizer.model_id)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            if self._is_probe(request):
                self._answer_probe(request)
                continue
            self.pool.submit(self._serve, request, request.get_response_sender())

    def _is_probe(self, request: Any) -> bool:
        tensor = self.pb.get_input_tensor_by_name(request, "probe")
        return tensor is not None and is_probe(tensor.as_numpy())

    def _answer_probe(self, request: Any) -> None:
        """Answer a liveness probe on Triton's thread, ahead of the request pool (a busy
        pool must not look like a dead router), with this instance's id."""
        try:
            delta = probe_answer(self.instance_id)
            request.get_response_sender().send(
                response(self.pb, encode_router_outputs(delta)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
        except Exception:  # the prober went away; nothing else depends on this response
            logger.debug("router %s: probe answer not delivered", self.name, exc_info=True)

    def _serve(self, request: Any, sender: Any) -> None:
        pb = self.pb

        def emit(delta: RouterDelta) -> None:
            flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if delta.final else 0
            sender.send(response(pb, encode_router_outputs(delta)), flags=flags)

        try:
            parameters = json.loads(request.parameters() or "{}")
            parent = parameters.pop(tracing.TRACEPARENT, None)  # the caller's trace, if any
            check_parameters(parameters)
            parsed = parse_router_inputs(read_inputs(pb, request, ROUTER_INPUTS.names))
            with tracing.span("router.request", parent if isinstance(parent, str) else None,
                              request_id=parsed.request_id, router=self.name):
                self.orchestrator.run(parsed, emit, request.is_cancelled)
        except TridentError as exc:
            logger.info("request failed: %s", exc)
            self._send_error(sender, exc)
        except Exception as exc:
            if _cancelled(request):
                logger.info("request ended after the client cancelled it: %s", exc)
                close_quietly(pb, sender)
            else:
                logger.exception("router %s: unexpected error", self.name)
                self._send_error(sender, f"internal error in router {self.name}: {exc}")
        self._after_request()

    def _after_request(self) -> None:
        """Request thread, after its final response: push routing metrics to the server and
        re-probe the pools when due, off the next request's path. If another thread is at
        it, skip: its flush or the next one carries this request."""
        if not self._flush_lock.acquire(blocking=False):
            return
        try:
            self.exporter.flush()
            for routing in self.pools.values():
                routing.directory.refresh()
        except Exception:  # the response is out; this must never fail the request thread
            logger.exception("router %s: metrics flush or worker re-probe failed", self.name)
        finally:
            self._flush_lock.release()

    def _send_error(self, sender: Any, exc: BaseException | str) -> None:
        try:
            send_final_error(self.pb, sender, exc)
        except Exception as send_exc:  # the client is gone
            logger.info("could not deliver error %r: %s", str(exc), send_exc)

    def finalize(self) -> None:
        logger.debug("router %s: finalize", self.name)
        self.pool.shutdown(wait=True, cancel_futures=False)
        for routing in self.pools.values():
            routing.close()
        self.exporter.close()
        if self.grpc is not None:
            self.grpc.close()
        if self.remote is not None:
            self.remote.close()
        release_retired()
        tracing.shutdown()
        logger.debug("router %s: finalized", self.name)


def _cancelled(request: Any) -> bool:
    try:
        return bool(request.is_cancelled())
    except Exception:
        return True
