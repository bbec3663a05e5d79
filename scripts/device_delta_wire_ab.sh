#!/usr/bin/env bash
# On the GPU machine of the `device` tool: the engine's e2e tests on CUDA, then
# benchmarks/delta-wire-ab.toml (S with OutputDelta's positional pickling against d782915's
# tree). The base tree travels as .gpu/ab-base/src (made here with
#   rm -rf .gpu/ab-base && mkdir -p .gpu/ab-base && git archive d782915 src | tar -x -C .gpu/ab-base
# ), carry [".whl", ".gpu/sharegpt3000.json.gz", ".gpu/ab-base"].
set -uo pipefail
source scripts/device_env.sh
gunzip -kf .gpu/sharegpt3000.json.gz
run_engine_e2e_tests
bash scripts/device_lab.sh benchmarks/delta-wire-ab.toml
