"""One vLLM engine with one KV connector, in a process of its own, on one core
(`benchmarks.kv_connectors`; protocol: `benchmarks.common.Peer`).

kind "trident": our vLLM engine plugin (`plugins.vllm.VllmEngine`) with our connector, the
path `trident serve --engine vllm --prefill N` takes: the prefill side returns our descriptor,
the decode side is given the prompt, the descriptor and the first token.
kind "nixl": vLLM's `LLMEngine` with vLLM's `NixlConnector` (UCX over DRAM on this CPU
machine, `kv_buffer_device="cpu"`), driven the way vLLM's own disaggregation proxy drives it:
the prefill request carries `do_remote_decode`, its output's `kv_transfer_params` go to the
decode request with the same prompt; the decode side computes the last prompt token itself.
Both are built from the same `VllmEngineConfig` (`plugins.vllm.setup.engine_args`), so
nothing but the connector differs.

Commands: `prefill(ids)` -> (first token, handoff, seconds); `decode(ids, first, handoff,
max_tokens)` -> (all output tokens, seconds to the decode side's first token, seconds to the
last).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import uuid
from typing import Any


def serve(kind: str, opts: dict, conn) -> None:
    os.sched_setaffinity(0, {opts["core"]})
    try:
        peer = TridentPeer(opts) if kind == "trident" else NixlPeer(opts)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", {"kind": kind, "role": opts["role"], "core": opts["core"]}))
    try:
        while True:
            command, kwargs = conn.recv()
            if command == "quit":
                break
            try:
                conn.send(("ok", getattr(peer, command)(**kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        peer.close()


def engine_config(opts: dict, worker_id: str):
    from plugins.vllm.config import VllmEngineConfig

    return VllmEngineConfig(
        enforce_eager=opts["eager"], kv_cache_mb=opts["kv_cache_mb"], num_threads=1, worker_id=worker_id,
        shareable_kv=opts["role"] == "prefill", kv_staging_mb=opts["kv_cache_mb"],
    ).validate()


class TridentPeer:
    def __init__(self, opts: dict) -> None:
        from plugins.vllm.engine import VllmEngine

        self.engine = VllmEngine(engine_config(opts, f"bench-{opts['role']}"))
        self.engine.start()

    def prefill(self, ids: list[int]) -> tuple[int, bytes, float]:
        from trident.core.types import GenerateRequest, SamplingParams

        t0 = time.perf_counter()
        request = GenerateRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True)
        last = list(self.engine.generate(request, timeout=300))[-1]
        return last.output_ids[0], last.kv_descriptor, time.perf_counter() - t0

    def decode(self, ids: list[int], first: int, handoff: bytes, max_tokens: int) -> tuple[list[int], float, float]:
        from trident.core.types import GenerateRequest, SamplingParams

        t0 = time.perf_counter()
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = GenerateRequest(uuid.uuid4().hex, tuple(ids), sp, kv_descriptor=handoff, first_token=first)
        tokens, t_first = [first], None
        for chunk in self.engine.generate(request, timeout=300):
            if chunk.output_ids and t_first is None:
                t_first = time.perf_counter() - t0
            tokens.extend(chunk.output_ids)
        return tokens, t_first, time.perf_counter() - t0

    def close(self) -> None:
        self.engine.shutdown()


def alias_nixl() -> None:
    """vLLM imports NIXL as `nixl`; the CUDA 12 wheel installs it as `nixl_cu12` (its UCX
    backend moves DRAM on a CPU-only machine just the same)."""
    try:
        import nixl._api  # noqa: F401
        return
    except ImportError:
        pass
    import nixl_cu12
    import nixl_cu12._api
    import nixl_cu12._bindings

    sys.modules["nixl"] = nixl_cu12
    sys.modules["nixl._api"] = nixl_cu12._api
    sys.modules["nixl._bindings"] = nixl_cu12._bindings


class NixlPeer:
    def __init__(self, opts: dict) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(opts["side_channel_port"])
        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        alias_nixl()
        import dataclasses

        import torch
        from vllm.config import KVTransferConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        from plugins.vllm.model_dir import hf_model_dir
        from plugins.vllm.setup import engine_args

        config = engine_config(opts, f"bench-nixl-{opts['role']}")
        args = dataclasses.replace(
            engine_args(config, hf_model_dir(config.model, config.cache_dir)),
            kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both", kv_buffer_device="cpu"),
            kv_events_config=None,
        )
        self.llm = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        torch._C.set_num_threads(1)  # this thread steps vLLM, as VllmEngine's loop thread does

    def _run(self, ids: list[int], max_tokens: int, params: dict[str, Any]) -> tuple[list[int], float | None, Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA, extra_args={"kv_transfer_params": params})
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        self.llm.add_request(rid, {"prompt_token_ids": list(ids)}, sp)
        tokens: list[int] = []
        t_first = None
        final = None
        while final is None:
            for out in self.llm.step():
                if out.request_id != rid:
                    continue
                new = out.outputs[0].token_ids if out.outputs else []
                if new and t_first is None:
                    t_first = time.perf_counter() - t0
                tokens.extend(new)
                if out.finished:
                    final = out
        return tokens, t_first, final

    def prefill(self, ids: list[int]) -> tuple[int, dict, float]:
        t0 = time.perf_counter()
        tokens, _, final = self._run(ids, 1, {"do_remote_decode": True})
        return tokens[0], dict(final.kv_transfer_params), time.perf_counter() - t0

    def decode(self, ids: list[int], first: int, handoff: dict, max_tokens: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        tokens, t_first, _ = self._run(ids, max_tokens, handoff)
        return tokens, t_first, time.perf_counter() - t0

    def step_idle(self) -> None:
        """Let the prefill side process the decode side's "read done" notifications."""
        if self.llm.has_unfinished_requests():
            self.llm.step()

    def close(self) -> None:
        try:
            self.llm.engine_core.shutdown()
        except Exception:
            pass
