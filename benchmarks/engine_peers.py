"""One engine under test, in a process of its own, measured on command (`benchmarks.engine`).

Each peer ("torch": ours, "torch-aten": ours on PyTorch's kernels instead of our CPU kernels,
"vllm": vLLM's CPU build through our engine plugin, "transformers": `generate()`) is built once in a child process and then answers measurement commands from the
parent, so that the parent can interleave repetitions (A B C A B C ...) while every engine
keeps its own threads, thread binding and compiled state: vLLM's CPU worker binds OpenMP
threads and disables `torch.set_num_threads` for the rest of its process, which must not leak
into the others.

Protocol (a `multiprocessing` pipe): the child sends `("ready", info)` once built, then for
each `(command, kwargs)` it receives sends `("ok", result)` or `("error", text)`; `"quit"`
ends it. Commands: `decode(batch, new_tokens)` -> (tokens/s, step seconds), `prefill()` ->
tokens/s.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

TOPICS = ["the ocean", "a bicycle", "volcanoes", "the moon", "bread", "chess", "rain", "music"]
PEERS = ("torch", "vllm", "transformers", "torch-aten")


def make_prompts(tok, n: int, words: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i}). " + "Details: " + " ".join(
            f"item{j}" for j in range(words)
        )
        out.append(tok.encode(text))
    return out


# -- engines behind plugins.base (ours and vLLM through its plugin) -------------------------
def run_batch(engine, prompts: list[list[int]], sampling, tag: str) -> dict[str, Any]:
    """Submit `prompts` at once with `sampling` and wait for all of them: per request its
    first-token time and output count, every finish time, and how many ended before
    max_tokens. Used by `engine_decode` and `benchmarks.engine_structured`."""
    from trident.core.types import GenerateRequest

    firsts: dict[str, float] = {}
    counts: dict[str, int] = {}
    ends: list[float] = []
    early = 0
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def sink_for(rid: str):
        def sink(c) -> None:
            nonlocal early
            now = time.perf_counter()
            with lock:
                if c.output_ids:
                    firsts.setdefault(rid, now)
                    counts[rid] = counts.get(rid, 0) + len(c.output_ids)
                if c.finished:
                    early += c.finish_reason != "length"
                    ends.append(now)
                    done.release()

        return sink

    for i, p in enumerate(prompts):
        engine.submit(GenerateRequest(f"{tag}-{i}", tuple(p), sampling), sink_for(f"{tag}-{i}"))
    for _ in prompts:
        done.acquire()
    return {"firsts": firsts, "counts": counts, "ends": ends, "early": early}


def engine_decode(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, mean step seconds): from the last first token to the last token."""
    from trident.core.types import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    run = run_batch(engine, prompts, sp, f"d{len(prompts)}-{time.monotonic_ns()}")
    span = max(run["ends"]) - max(run["firsts"].values())
    return len(prompts) * (new_tokens - 1) / span, span / (new_tokens - 1)


def engine_prefill(engine, prompts: list[list[int]]) -> float:
    from trident.core.types import GenerateRequest, SamplingParams

    done = threading.Semaphore(0)
    sp = SamplingParams(max_tokens=1, temperature=0)
    tag = f"p-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(GenerateRequest(f"{tag}-{i}", tuple(p), sp), lambda c: c.finished and done.release())
    for _ in prompts:
        done.acquire()
    return sum(map(len, prompts)) / (time.perf_counter() - t0)


# -- transformers -------------------------------------------------------------------------
def hf_generate_time(model, prompts: list[list[int]], new_tokens: int) -> float:
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=2)
    return time.perf_counter() - t0


class _HF:
    """transformers as a peer: decode = generate(n) - generate(1), which isolates n-1 steps."""

    def __init__(self, model) -> None:
        self.model = model

    def decode(self, prompts, new_tokens: int) -> tuple[float, float]:
        full = hf_generate_time(self.model, prompts, new_tokens)
        first = hf_generate_time(self.model, prompts, 1)
        span = max(full - first, 1e-9)
        return len(prompts) * (new_tokens - 1) / span, span / (new_tokens - 1)

    def prefill(self, prompts) -> float:
        return sum(map(len, prompts)) / hf_generate_time(self.model, prompts, 1)


class _Plugin:
    def __init__(self, engine) -> None:
        self.engine = engine

    def decode(self, prompts, new_tokens: int) -> tuple[float, float]:
        return engine_decode(self.engine, prompts, new_tokens)

    def prefill(self, prompts) -> float:
        return engine_prefill(self.engine, prompts)


def build(kind: str, opts: dict[str, Any]):
    """(peer, info) for one kind, in this (child) process."""
    import torch

    threads = opts["threads"]
    if kind in ("torch", "torch-aten"):
        from plugins.torch_engine.config import TorchEngineConfig
        from plugins.torch_engine.engine import TorchEngine

        torch.set_num_threads(threads)
        engine = TorchEngine(TorchEngineConfig(dtype=opts["dtype"], kv_cache_mb=192, enable_prefix_caching=False,
                                               max_num_batched_tokens=2048, num_threads=threads,
                                               cpu_kernels=kind == "torch"))
        engine.start()
        return _Plugin(engine), {"weight_bytes": engine.runner.model.weight_bytes(), "dtype": opts["dtype"]}
    if kind == "vllm":
        from plugins.vllm.config import VllmEngineConfig
        from plugins.vllm.engine import VllmEngine

        engine = VllmEngine(VllmEngineConfig(dtype=opts["dtype"], kv_cache_mb=192, enable_prefix_caching=False,
                                             max_num_batched_tokens=2048, enforce_eager=opts["vllm_eager"],
                                             num_threads=threads))
        engine.start()
        return _Plugin(engine), {"dtype": engine.info().kv_layout.dtype, "compiled": not opts["vllm_eager"]}
    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        from trident.core.model_files import default_model_path

        torch.set_num_threads(threads)
        path = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=getattr(torch, opts["hf_dtype"])).eval()
        hf_generate_time(model, [[1, 2, 3]], 2)  # warm-up
        return _HF(model), {"dtype": opts["hf_dtype"]}
    raise ValueError(f"unknown peer {kind!r} (expected one of {PEERS})")


def serve(kind: str, opts: dict[str, Any], conn) -> None:
    """Child process entry point: build, say ready, answer commands until "quit"."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from router_ensemble.text.tokenizer import load_tokenizer

    try:
        peer, info = build(kind.partition("@")[0], opts)  # "kind@N": N threads, already in opts
        tok = load_tokenizer("")
        prompts = {
            1: make_prompts(tok, 1, opts["prompt_words"]),
            16: make_prompts(tok, 16, opts["prompt_words"]),
            "prefill": make_prompts(tok, 8, opts["prefill_words"]),
        }
        peer.decode(prompts[1], 8)  # warm-up (vLLM compiles the first shapes it sees)
        peer.decode(prompts[16], 8)
    except Exception as exc:
        conn.send(("error", f"{kind}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    while True:
        command, kwargs = conn.recv()
        if command == "quit":
            break
        try:
            if command == "decode":
                result = peer.decode(prompts[kwargs["batch"]], kwargs["new_tokens"])
            elif command == "prefill":
                result = peer.prefill(prompts["prefill"])
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("error", f"{kind} {command}: {type(exc).__name__}: {exc}"))
    engine = getattr(peer, "engine", None)
    if engine is not None:
        engine.shutdown()
