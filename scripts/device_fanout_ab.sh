#!/usr/bin/env bash
# The core fanout's A/B/C on the GPU machine of the `device` tool: S with four front ends
# (benchmarks/fanout-sender-ab.toml), the fanouts of 2fb7bdd and b8af41c (their two files
# carried in .gpu/old/ and .gpu/senders/, the rest of src/ as now) against this tree's.
# Carry [".whl", ".gpu"]. Fill them with
#   git show 2fb7bdd:src/kvtier/engine/core_fanout.py > .gpu/old/core_fanout.py
#   git show 2fb7bdd:src/kvtier/engine/engine_process.py > .gpu/old/engine_process.py
# and the same from b8af41c into .gpu/senders/.
set -uo pipefail
for side in old senders; do
    rm -rf "/tmp/${side}src" && cp -r src "/tmp/${side}src"
    cp ".gpu/$side/core_fanout.py" ".gpu/$side/engine_process.py" "/tmp/${side}src/kvtier/engine/"
    grep -c "DIRECT_SEND_MAX_BYTES\|_send_posted" "/tmp/${side}src/kvtier/engine/core_fanout.py"
done
gunzip -kf .gpu/sharegpt3000.json.gz
bash scripts/device_lab.sh benchmarks/fanout-sender-ab.toml
