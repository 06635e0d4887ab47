"""The two workloads and the model directory the vLLM-based systems load.

`main.main` calls `served_model_dir` once, then `build_workloads`, which parses `--workloads`
and, for `shared-prefix`, has `write_shared_prefix` write benchmarks.routing's workload as a
ShareGPT file into the log directory. A `Workload` carries the flags `servers.run_client` passes
to `vllm bench serve` and the decode workers `servers.start_server` gives Trident. Imports
nothing of this package.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

WORKLOADS = ("random", "shared-prefix")
SHAREGPT_MAX_PROMPT = 1024  # vllm.benchmarks.datasets.is_valid_sequence


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    decode: int  # Trident's decode workers
    flags: tuple[str, ...]  # workload flags of `vllm bench serve`
    description: str


def build_workloads(args: argparse.Namespace, tmp: str) -> list[Workload]:
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    out = []
    if "random" in chosen:
        out.append(Workload("random", 1, (
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        ), f"{args.num_prompts} random prompts, {args.input_len} in / {args.output_len} out, "
           f"concurrency {args.concurrency}; Trident: 1 decode worker"))
    if "shared-prefix" in chosen:
        path = os.path.join(tmp, "shared-prefix.json")
        count, mean_tokens = write_shared_prefix(args, path)
        out.append(Workload("shared-prefix", args.prefix_decode, (
            "--dataset-name", "sharegpt", "--dataset-path", path, "--sharegpt-output-len", str(args.answer_tokens),
            "--num-prompts", str(count), "--disable-shuffle",
        ), f"{count} chats ({args.groups} groups x {args.users} users x {args.questions}), prompts ~{mean_tokens:.0f} "
           f"tokens, {args.answer_tokens} out, concurrency {args.concurrency}; "
           f"Trident: {args.prefix_decode} decode workers, KV-aware routing"))
    return [w for name in chosen for w in out if w.name == name]


def write_shared_prefix(args: argparse.Namespace, path: str) -> tuple[int, float]:
    """benchmarks.routing's workload as a ShareGPT-format file of one-turn prompts; returns the
    number of requests and their mean prompt length in tokens, chat template included."""
    from benchmarks.routing import build_workload
    from router_ensemble.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spec = argparse.Namespace(seed=args.seed, groups=args.groups, users=args.users, questions=args.questions,
                              system_tokens=args.system_tokens, question_tokens=args.question_tokens,
                              rate=1.0)  # arrival times are not used: vllm bench serve paces the requests
    requests = build_workload(spec, tokenizer)
    entries, tokens = [], 0
    for i, r in enumerate(requests):
        system, user = (m["content"] for m in json.loads(r.messages))
        prompt = f"{system}\n\n{user}"
        if len(tokenizer.encode(prompt)) > SHAREGPT_MAX_PROMPT:
            raise SystemExit(f"shared-prefix prompts must stay within {SHAREGPT_MAX_PROMPT} tokens "
                             "(vllm bench serve drops longer ShareGPT prompts); lower --system-tokens")
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        tokens += len(tokenizer.encode(chat, add_special_tokens=False))
        entries.append({"id": str(i), "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]})
    with open(path, "w") as f:
        json.dump(entries, f)
    return len(requests), tokens / len(requests)


def served_model_dir(model: str, out: str) -> str:
    """The Hugging Face directory Trident's vLLM workers load (`hf_model_dir`), with the tokenizer
    files `vllm serve` and the client need. That directory has none (the workers take token ids),
    so unless it does, `out` gets links to its files plus the tokenizer Trident's router uses."""
    from plugins.vllm.model_dir import hf_model_dir
    from router_ensemble.text.tokenizer import export_hf_tokenizer
    from trident.core.model_files import resolve_model_path

    source = hf_model_dir(model)
    if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
        return source
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(source):
        if not os.path.lexists(os.path.join(out, entry)):
            os.symlink(os.path.join(source, entry), os.path.join(out, entry))
    export_hf_tokenizer(resolve_model_path(model), out)
    return out
