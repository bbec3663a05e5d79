#!/usr/bin/env bash
# The closing device call of a session on the GPU machine of the `device` tool: the kernel
# tests and gpu_check (device_gpu_check.sh), then the article's runs (`kvtier lab`, the peer's
# setup), outputs under $OUT. Carry [".whl", ".gpu"] (scripts/device_lab.sh says what they hold).
#
#   bash scripts/device_final_check.sh
set -uo pipefail
bash scripts/device_gpu_check.sh
bash scripts/device_lab.sh .gpu/seed-gpu-device.toml
