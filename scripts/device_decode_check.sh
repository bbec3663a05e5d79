#!/usr/bin/env bash
# The decode path on the GPU machine of the `device` tool, in one call: the Triton kernel tests
# (correctness on the card, PDL included), the per-projection `small_linear` tune and
# gpu_check's decode-graph variants (timings and the logits checks). Outputs under $OUT.
#
#   bash scripts/device_decode_check.sh            (carry [".whl"])
set -uo pipefail
source scripts/device_env.sh
run_kernel_tests
python3 scripts/tune_small_linear.py --out "$out/small_linear.json" > "$out/tune.txt" 2>&1
grep "^==" "$out/tune.txt"
python3 scripts/gpu_check.py --only-decode --out "$out/gpu_check.json" > "$out/gpu_check.txt" 2>&1
grep -E "decode|card|Error|error" "$out/gpu_check.txt" | grep -v '^ *"'
