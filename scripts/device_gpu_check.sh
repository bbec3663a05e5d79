#!/usr/bin/env bash
# gpu_check on the GPU machine of the `device` tool, after the Triton kernel tests and the
# engine's end-to-end tests that run on CUDA: the correctness checks and timings (HF's
# own speed skipped unless --with-hf), then the greedy check with the KV witness per tier
# setup (scripts/greedy_async_check_gpu.py); outputs under $OUT. On an H200, run apart: the
# kernel tests 132 s and the engine e2e tests 110 s (twenty-seventh session), gpu_check and the
# greedy check about 2 minutes more (twenty-sixth).
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
# Greedy tokens batched and one by one, and the KV witness, per tier setup (a disk one too).
python3 scripts/greedy_async_check_gpu.py --configs default-off,default-cpu,default-cpu-disk \
    --out "$out/greedy.json" > "$out/greedy.txt" 2>&1 || status=1
print_greedy_report "$out/greedy.json"
exit $status
