"""`python -m plugins.torch_engine.kernels`: compile the CPU kernels beside their source, for
an image whose runtime stage has no C compiler (docker/Dockerfile). A CPU the kernels are not
for is not an error (the engine keeps PyTorch's kernels there); a failed compile exits 1."""

from __future__ import annotations

import sys

from plugins.torch_engine.kernels import build


def main() -> int:
    why = build.supported()
    if why is not None:
        print(f"CPU kernels not built: {why}", file=sys.stderr)
        return 0
    cc = build.compiler()
    if cc is None:
        print("CPU kernels not built: no C compiler (cc, gcc or clang) on PATH", file=sys.stderr)
        return 1
    print(build.compile_into(cc, build.SOURCE_DIR / build.library_name()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
