"""Compiling the kernels' C sources (every `*.c` and `*.h` beside this file) into one library:
where it goes and when it can be had.

`build(cache_root)` is called by `kernels.load()` once per process and cache root. It returns
a library built beside the source whose digest matches (images whose runtime stage has no
compiler: `python -m plugins.torch_engine.kernels` in docker/Dockerfile's build stage), else
one compiled with the system C compiler into `<cache root>/kernels/` (the root as for
converted weights: `TRIDENT_CACHE_DIR`, else `~/.cache/trident`), keyed by a digest of the
source and flags.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from plugins.torch_engine import loader

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
FLAGS = ("-O3", "-mavx2", "-mfma", "-pthread", "-shared", "-fPIC", "-std=gnu11")


def supported() -> str | None:
    """None when this machine can run the kernels, else why not."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def sources() -> list[Path]:
    return sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")])


def library_name() -> str:
    """The compiled library's file name, keyed by the sources and the flags."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"cpu_kernels-{digest.hexdigest()[:16]}.so"


def build(cache_root: str) -> Path:
    """The library's path, compiling it if no build of this source is found."""
    prebuilt = SOURCE_DIR / library_name()
    if prebuilt.exists():
        return prebuilt
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    return compile_into(cc, Path(loader.cache_root(cache_root)) / "kernels" / library_name())


def compile_into(cc: str, target: Path) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        units = [str(p) for p in sources() if p.suffix == ".c"]
        done = subprocess.run([cc, *FLAGS, *units, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-2000:])
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        log.info("compiled the float32 CPU kernels into %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
