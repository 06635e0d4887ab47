"""`python -m planner.profile`: measure one worker on this machine, write the profile.

`main(argv)` parses flags (each also an environment variable `TRIDENT_PROFILE_<FIELD>`) into a
`ProfileConfig`, then `run(config)`: attach to `--grpc-url`, or start a server of one decode
worker with the launcher on free ports (stopped in a `finally`, also on SIGTERM), measure with
`planner.profile.measure.measure_profile`, and save the `Profile` to `--out`. Progress goes
to stderr through `logging`. Exit code 0 on success, 1 on a `TridentError`.

    python -m planner.profile --out profile.json            # full tables, own server
    python -m planner.profile --short --grpc-url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from planner.core.profile import Profile
from planner.profile.measure import RAMP_GAPS, Plan, measure_profile
from trident.core.errors import ConfigError, TridentError
from trident.core.flags import add_flags, from_namespace
from trident.launcher import Launcher
from trident.serve_config import LOG_LEVELS, ServeConfig

logger = logging.getLogger("planner.profile")

ENV_PREFIX = "TRIDENT_PROFILE_"
# What an unset list / count means, in full and in short mode.
FULL = {
    "input_lengths": "64,128,256,512,1024",
    "contexts": "128,512",
    "concurrency": "1,2,4,8,16",
    "repeats": 3,
    "decode_tokens": 48,
}
SHORT = {
    "input_lengths": "32,128",
    "contexts": "64",
    "concurrency": "1,4",
    "repeats": 1,
    "decode_tokens": 12,
}

_HELP = {
    "grpc_url": "HOST:PORT of a running server to measure ('' = start one decode worker here)",
    "out": "where to write the profile (JSON)",
    "short": "quick mode for tests: few, small points",
    "input_lengths": f"prefill input lengths, comma-separated ('' = {FULL['input_lengths']}; short {SHORT['input_lengths']})",
    "contexts": f"decode prompt lengths ('' = {FULL['contexts']}; short {SHORT['contexts']})",
    "concurrency": f"decode stream counts ('' = {FULL['concurrency']}; short {SHORT['concurrency']})",
    "repeats": f"prefill requests per input length (0 = {FULL['repeats']}; short {SHORT['repeats']})",
    "decode_tokens": f"tokens each decode stream generates (0 = {FULL['decode_tokens']}; short {SHORT['decode_tokens']})",
    "seed": "seed of the random prompts",
    "target": "model the requests go to: router, or a worker model (decode) to bypass the router",
    "model": "own server: GGUF file or Hugging Face directory ('' = default)",
    "dtype": "own server: engine dtype: auto, bfloat16, float32, float16 ('' = model config)",
    "num_threads": "own server: torch threads of the worker (0 = model config)",
    "kv_cache_mb": "own server: KV pool size in MiB (0 = model config)",
    "startup_timeout_s": "own server: seconds to wait for it to become ready",
    "log_level": "log level: debug, info, warning, error",
}


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """The profiler's settings. Built by `from_args` (CLI) or directly (tests)."""

    grpc_url: str = ""
    out: str = "profile.json"
    short: bool = False
    input_lengths: str = ""
    contexts: str = ""
    concurrency: str = ""
    repeats: int = 0
    decode_tokens: int = 0
    seed: int = 0
    target: str = "router"
    model: str = ""
    dtype: str = ""
    num_threads: int = 0
    kv_cache_mb: int = 0
    startup_timeout_s: float = 600.0
    log_level: str = "info"

    def validate(self) -> ProfileConfig:
        """Return self, or raise `ConfigError` naming the first bad flag."""
        self.plan()
        if not self.out:
            raise ConfigError("out (--out): must not be empty")
        if not self.target:
            raise ConfigError("target (--target): must not be empty")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log_level (--log-level): must be one of {LOG_LEVELS}, got {self.log_level!r}"
            )
        self.serve_config()
        return self

    def plan(self) -> Plan:
        """The lists parsed, unset values replaced by the mode's defaults."""
        defaults = SHORT if self.short else FULL
        lengths = _int_list("input_lengths", self.input_lengths or str(defaults["input_lengths"]))
        if len(lengths) < 2:
            raise ConfigError(
                f"input_lengths (--input-lengths): need at least two lengths, got {self.input_lengths!r}"
            )
        repeats = self.repeats or int(defaults["repeats"])
        tokens = self.decode_tokens or int(defaults["decode_tokens"])
        if repeats < 1:
            raise ConfigError(
                f"repeats (--repeats): must be >= 1 (0 = default), got {self.repeats}"
            )
        if tokens < RAMP_GAPS + 2:
            raise ConfigError(
                f"decode_tokens (--decode-tokens): must be >= {RAMP_GAPS + 2}, got {self.decode_tokens}"
            )
        return Plan(
            input_lengths=lengths,
            contexts=_int_list("contexts", self.contexts or str(defaults["contexts"])),
            concurrency=_int_list("concurrency", self.concurrency or str(defaults["concurrency"])),
            repeats=repeats,
            decode_tokens=tokens,
            seed=self.seed,
            target=self.target,
        )

    def serve_config(self) -> ServeConfig:
        """The server `run` starts when no `--grpc-url` is given (validated)."""
        return ServeConfig(
            decode=1,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            openai_port=-1,
            model=self.model,
            dtype=self.dtype,
            num_threads=self.num_threads,
            kv_cache_mb=self.kv_cache_mb,
            startup_timeout_s=self.startup_timeout_s,
            log_level=self.log_level,
        ).validate()

    def meta(self) -> dict[str, Any]:
        """What the profile records about how it was measured."""
        return {
            "server": self.grpc_url or "launched",
            "model": self.model or "default",
            "dtype": self.dtype or "model config",
            "num_threads": self.num_threads,
            "kv_cache_mb": self.kv_cache_mb,
            "short": self.short,
            "seed": self.seed,
        }

    @classmethod
    def from_args(cls, argv: Sequence[str], env: Mapping[str, str] | None = None) -> ProfileConfig:
        args = build_parser().parse_args(list(argv))
        return from_namespace(cls, args, os.environ if env is None else env, ENV_PREFIX)


def _int_list(name: str, text: str) -> tuple[int, ...]:
    """'64, 128' -> (64, 128): positive, distinct, ascending; `ConfigError` naming the flag."""
    flag = "--" + name.replace("_", "-")
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{name} ({flag}): {text!r} is not a comma-separated list of integers"
        ) from None
    if any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{name} ({flag}): values must be positive and distinct, got {text!r}")
    return tuple(sorted(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m planner.profile", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    return add_flags(parser, ProfileConfig, _HELP, ENV_PREFIX)  # `--short` alone means true


def run(config: ProfileConfig) -> Profile:
    """Measure (starting and stopping a server unless attached) and save the profile."""
    if config.grpc_url:
        profile = measure_profile(config.grpc_url, config.plan(), config.meta())
    else:
        launcher = Launcher(config.serve_config(), progress=logger.info)
        try:
            endpoints = launcher.start()
            profile = measure_profile(endpoints.grpc_url, config.plan(), config.meta())
        finally:
            launcher.stop()
    profile.save(config.out)
    logger.info(
        "wrote %s (%d prefill, %d decode points)",
        config.out,
        len(profile.prefill),
        len(profile.decode),
    )
    return profile


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[profile] %(message)s", stream=sys.stderr)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(143)  # unwinds through run's finally, which stops the server

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        config = ProfileConfig.from_args(sys.argv[1:] if argv is None else argv)
        logging.getLogger().setLevel(config.log_level.upper())
        run(config)
        return 0
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
