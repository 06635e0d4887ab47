"""`python -m plugins.torch_engine.kernels`: compile the CPU kernels beside their source, for
an image whose runtime stage has no C compiler (docker/Dockerfile). A CPU the kernels are not
for is not an error (the engine keeps PyTorch's kernels there); a failed compile exits 1."""

from __future__ import annotations

import sys

from plugins.torch_engine import kernels


def main() -> int:
    why = kernels.supported()
    if why is not None:
        print(f"CPU kernels not built: {why}", file=sys.stderr)
        return 0
    cc = kernels._compiler()
    if cc is None:
        print("CPU kernels not built: no C compiler (cc, gcc or clang) on PATH", file=sys.stderr)
        return 1
    print(kernels._compile(cc, kernels._SOURCE.parent / kernels.library_name()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
