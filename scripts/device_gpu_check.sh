#!/usr/bin/env bash
# gpu_check on the GPU machine of the `device` tool, after the Triton kernel tests: the issue's
# correctness checks and timings (HF's own speed skipped unless --with-hf), outputs under $OUT.
#
#   bash scripts/device_gpu_check.sh            (carry [".whl"])
set -uo pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:$PWD/scripts:/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_small_linear.py \
    tests/gpu/test_fused_ops.py tests/gpu/test_piecewise_graphs.py \
    tests/gpu/test_triton_attention.py 2>&1 | tail -n 8
hf=--skip-hf
[ "${1:-}" = "--with-hf" ] && hf=
python3 scripts/gpu_check.py $hf --out "$out/gpu_check.json" > "$out/gpu_check.txt" 2>&1
status=$?
grep -E "decode graph|identical|Error|error" "$out/gpu_check.txt" | grep -v '^ *"'
tail -n 60 "$out/gpu_check.txt" | grep -E '"(prefill|decode_b1|tok_s|tier_load|greedy|argmax|logits_max|speedup|hf_)'
exit $status
