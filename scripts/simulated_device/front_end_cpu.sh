#!/usr/bin/env bash
# Front-end CPU per streamed token (issue 6): `kvtier serve` on the simulated device (see
# sitecustomize.py here; the engine process only pretends to run steps of STEP seconds) serves
# N ShareGPT prompts at once to `kvtier bench`; prints the front-end process's CPU seconds
# (user + system, from /proc) per generated token, with the bench's rate and latencies.
#
#   STEP=0.004 N=300 bash scripts/simulated_device/front_end_cpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export KVTIER_SIM_STEP_S=${STEP:-0.004} PYTHONPATH=scripts/simulated_device:src
port=${PORT:-8391}
.venv/bin/python -m kvtier.cli serve --model random:tiny-llama --port "$port" \
    --num-gpu-blocks-override 4096 --max-num-batched-tokens 8192 > /tmp/front_end_cpu_serve.log 2>&1 &
pid=$!
for _ in $(seq 1 120); do curl -s "localhost:$port/health" > /dev/null && break; sleep 1; done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(cpu_ticks)
.venv/bin/python -m kvtier.cli bench --port "$port" --dataset-name sharegpt --num-prompts "${N:-300}" \
    --request-rate inf --ignore-eos --temperature 0 --seed 0 --disable-tqdm > /tmp/front_end_cpu_bench.log 2>&1
after=$(cpu_ticks)
tokens=$(awk '/Total generated tokens/ {print $4}' /tmp/front_end_cpu_bench.log)
ticks_per_s=$(getconf CLK_TCK)
echo "front end: $(awk -v t=$((after - before)) -v n="$tokens" -v hz="$ticks_per_s" \
    'BEGIN {printf "%.1f", t / hz / n * 1e6}') us CPU per token ($tokens tokens);" \
    "$(grep -E 'Request throughput|Mean ITL|P99 ITL|Mean TTFT' /tmp/front_end_cpu_bench.log | tr -s ' ' | tr '\n' ';')"
kill -TERM "$pid"
wait "$pid"
