#!/usr/bin/env bash
# `--batch-invariant` on the GPU machine of the `device` tool: its kernel tests, then
# gpu_check's logits against HF, speeds and greedy checks with the engines batch-invariant
# (the Qwen2.5-1.5B shape, bf16), then the greedy check with the KV witness per tier setup:
# batched must equal one by one, every tier setup tier-off, and every recomputed block its
# first computation. Outputs under $OUT.
#
#   bash scripts/device_batch_invariance.sh            (carry [".whl"])
set -uo pipefail
source scripts/device_env.sh
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_batch_invariance.py \
    > "$out/batch_invariance_kernel_tests.log" 2>&1
grep -E "^E .*(differ|Error)|passed|failed" "$out/batch_invariance_kernel_tests.log" | tail -n 12
python3 scripts/gpu_check.py --batch-invariant --skip-hf --out "$out/gpu_check_invariant.json" \
    > "$out/gpu_check_invariant.txt" 2>&1
status=$?
tail -n 40 "$out/gpu_check_invariant.txt" | grep -E '"(prefill|decode_b1|tok_s|greedy|argmax|logits_max)'
grep -E "Error|error" "$out/gpu_check_invariant.txt" | tail -n 5
python3 scripts/greedy_async_check_gpu.py --batch-invariant \
    --configs default-off,default-cpu,default-cpu-disk,sync-off \
    --out "$out/greedy_invariant.json" > "$out/greedy_invariant.txt" 2>&1 || status=1
print_greedy_report "$out/greedy_invariant.json"
exit $status
