#!/usr/bin/env bash
# gpu_check on the GPU machine of the `device` tool, after the Triton kernel tests and the
# engine's end-to-end tests that run on CUDA: the correctness checks and timings (HF's
# own speed skipped unless --with-hf), outputs under $OUT.
#
#   bash scripts/device_gpu_check.sh            (carry [".whl"])
set -uo pipefail
source scripts/device_env.sh
run_kernel_tests
run_engine_e2e_tests
hf=--skip-hf
[ "${1:-}" = "--with-hf" ] && hf=
python3 scripts/gpu_check.py $hf --out "$out/gpu_check.json" > "$out/gpu_check.txt" 2>&1
status=$?
grep -E "decode graph|identical|Error|error" "$out/gpu_check.txt" | grep -v '^ *"'
tail -n 60 "$out/gpu_check.txt" | grep -E '"(prefill|decode_b1|tok_s|tier_load|greedy|argmax|logits_max|speedup|hf_)'
exit $status
