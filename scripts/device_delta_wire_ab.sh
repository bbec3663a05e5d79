#!/usr/bin/env bash
# On the GPU machine of the `device` tool: the engine's e2e tests on CUDA (E2E=0 skips
# them), then benchmarks/delta-wire-ab.toml (S on three wire formats of the engine pipe). The
# older trees travel as .gpu/ab-base/src and .gpu/ab-mid/src, made here with
#   rm -rf .gpu/ab-base && mkdir -p .gpu/ab-base && git archive d782915 src | tar -x -C .gpu/ab-base
#   rm -rf .gpu/ab-mid && mkdir -p .gpu/ab-mid && git archive 151e3a4 src | tar -x -C .gpu/ab-mid
# carry [".whl", ".gpu/sharegpt3000.json.gz", ".gpu/ab-base", ".gpu/ab-mid"].
set -uo pipefail
source scripts/device_env.sh
gunzip -kf .gpu/sharegpt3000.json.gz
[ "${E2E:-1}" = 1 ] && run_engine_e2e_tests
bash scripts/device_lab.sh benchmarks/delta-wire-ab.toml
