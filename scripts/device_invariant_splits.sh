#!/usr/bin/env bash
# The batch-invariant mode's splits on the GPU machine of the `device` tool: its kernel
# tests, the greedy check with the KV witness per tier setup in the mode (batched = one by
# one, every tier setup = tier-off, every recomputed block = its first computation), then
# scripts/invariant_splits_ab.py (fixed KV splits and split-K against neither). Outputs
# under $OUT.
#
#   bash scripts/device_invariant_splits.sh            (carry [".whl"])
set -uo pipefail
source scripts/device_env.sh
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_batch_invariance.py \
    > "$out/batch_invariance_kernel_tests.log" 2>&1
grep -E "^E .*(differ|Error)|passed|failed" "$out/batch_invariance_kernel_tests.log" | tail -n 12
python3 scripts/greedy_async_check_gpu.py --batch-invariant \
    --configs default-off,default-cpu,default-cpu-disk \
    --out "$out/greedy_invariant.json" > "$out/greedy_invariant.txt" 2>&1
status=$?
print_greedy_report "$out/greedy_invariant.json"
# The default split length, twice its length, and no splits (one engine per process).
for variant in "splits" "splits --split-keys 2048" "whole"; do
    python3 scripts/invariant_splits_ab.py --variant $variant \
        --out "$out/invariant_splits_ab_${variant//[ -]/}.json" \
        >> "$out/invariant_splits_ab.txt" 2>&1 || status=1
done
grep -E '^\{|Error' "$out/invariant_splits_ab.txt"
exit $status
