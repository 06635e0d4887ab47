"""docker/Dockerfile.trtllm: the TensorRT-LLM variant of the image, linted and checked here.

Nothing builds or runs it here (no Docker daemon, no GPU, and the NGC base image is not
reachable); it is linted by hadolint with the rules docker/Dockerfile obeys, and what it sets is
checked against the code that reads it.
"""

from __future__ import annotations

from pathlib import Path

from tests.docker.deployment_files import DOCKER, ROOT, dockerfile_env, dockerfile_instructions
from tests.docker.test_deployment import ALLOWED_IGNORES, _ignored, hadolint

DOCKERFILE = DOCKER / "Dockerfile.trtllm"


def test_the_trtllm_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            assert all(r.strip() in ALLOWED_IGNORES for r in line.split("ignore=", 1)[1].split(","))


def test_its_base_is_the_image_the_plugin_is_pinned_to() -> None:
    from plugins.trtllm.config import TRTLLM_IMAGE

    steps = dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [a for k, a in steps if k == "FROM"]
    assert bases and all(b.startswith("nvcr.io/nvidia/tritonserver:${TRITON_TAG}") for b in bases)
    assert f"nvcr.io/nvidia/tritonserver:{args['TRITON_TAG']}" == TRTLLM_IMAGE
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert (
        "--system-site-packages" in runs
    )  # the image's tensorrt_llm, torch and transformers stay visible
    for shadowing in ("torch", "transformers", "numpy"):  # never reinstalled over the image's
        assert f"{shadowing}|" in runs or f"|{shadowing}" in runs, shadowing
    assert "import tensorrt_llm, plugins.trtllm.engine" in runs


def test_it_serves_with_the_trtllm_engine_on_cuda_as_a_non_root_user() -> None:
    from trident.serve_config import ServeConfig

    env = dockerfile_env(DOCKERFILE.read_text())
    assert env["TRIDENT_ENGINE"] == "trtllm" and env["TRIDENT_DEVICE"] == "cuda"
    config = ServeConfig.from_env(
        {k: v for k, v in env.items() if k.startswith("TRIDENT_")}
    ).validate()
    assert config.engine == "trtllm" and config.engine_env()["TRIDENT_ROUTER_BLOCK_SIZE"] == "32"
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    assert [a for k, a in final if k == "USER"][-1] == "10001:10001"
    assert next(a for k, a in final if k == "CMD") == '["trident", "serve"]'


def test_its_build_context_keeps_the_plugin_and_leaves_out_tests_and_models() -> None:
    ignore = DOCKER / "Dockerfile.trtllm.dockerignore"
    patterns = [
        p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for path in (
        "plugins/trtllm/engine.py",
        "plugins/vllm/model_dir.py",
        "requirements.txt",
        "setup.py",
        "docker/entrypoint.sh",
        "model_repository/decode/config.pbtxt",
    ):
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), path
    for path in (
        ".git/HEAD",
        "tests/conftest.py",
        "models/x.gguf",
        "m/model.safetensors",
        ".venv/bin/python",
    ):
        assert _ignored(path, patterns), path
