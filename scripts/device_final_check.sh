#!/usr/bin/env bash
# The closing device call of a session on the GPU machine of the `device` tool: the fused-kernel
# tests, gpu_check (HF's own speed skipped) and the article's runs (`kvtier lab`, the peer's
# setup), outputs under $OUT. Carry [".whl", ".gpu"] (scripts/device_lab.sh says what they hold).
#
#   bash scripts/device_final_check.sh
set -uo pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:$PWD/scripts:/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_small_linear.py \
    tests/gpu/test_fused_ops.py tests/gpu/test_piecewise_graphs.py 2>&1 | tail -n 4
python3 scripts/gpu_check.py --skip-hf --out "$out/gpu_check.json" > "$out/gpu_check.txt" 2>&1
grep -E "decode graph|identical" "$out/gpu_check.txt"
bash scripts/device_lab.sh .gpu/seed-gpu-device.toml
