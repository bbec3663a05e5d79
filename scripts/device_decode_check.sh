#!/usr/bin/env bash
# The decode path on the GPU machine of the `device` tool, in one call: the Triton kernel tests
# (correctness on the card, PDL included), the per-projection `small_linear` tune and
# gpu_check's decode-graph variants (timings and the PDL logits check). Outputs under $OUT.
#
#   bash scripts/device_decode_check.sh            (carry [".whl"])
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
python3 scripts/tune_small_linear.py --out "$out/small_linear.json" > "$out/tune.txt" 2>&1
grep "^==" "$out/tune.txt"
python3 scripts/gpu_check.py --only-decode --out "$out/gpu_check.json" > "$out/gpu_check.txt" 2>&1
grep -E "decode|card|Error|error" "$out/gpu_check.txt" | grep -v '^ *"'
