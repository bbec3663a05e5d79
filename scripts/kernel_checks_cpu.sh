#!/usr/bin/env bash
# `make test`'s kernel checks that need no GPU, run side by side: each is one single-threaded
# process (Triton's CPU interpreter, ptxas), so on CI's two cores the four take about half
# the ~4.7 minutes they took one after another. Each one's log is printed whole when all
# have ended; the exit status is the first failure's.
#
#   decode:     the decode path's GEMV and fused-op kernels, under the interpreter;
#   invariance: the batch-invariant kernels, under the interpreter;
#   attention:  the attention kernels' cases that run there in ~1.5 minutes (the whole file
#               takes ~10): every decode shape, mixed batches in both dtypes, splits, small and
#               causal-boundary tiles, an extend over a split prefix, whole prompts (the rest:
#               on the device and by hand);
#   hopper:     the kernels' sm_90 builds (Triton's bundled ptxas): no spills, 16-byte loads,
#               PDL.
#
#   bash scripts/kernel_checks_cpu.sh .venv/bin/python
set -u
python=${1:-python3}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# One thread each: the processes share the cores, and torch's own thread pool per process
# only adds contention.
export OMP_NUM_THREADS=1

TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider --noconftest -m gpu \
    tests/gpu/test_small_linear.py tests/gpu/test_fused_ops.py > "$logs/decode" 2>&1 &
decode=$!
TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider --noconftest -m gpu \
    tests/gpu/test_batch_invariance.py > "$logs/invariance" 2>&1 &
invariance=$!
TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider --noconftest -m gpu \
    tests/gpu/test_triton_attention.py \
    -k "decode or both_dtypes or small_tiles or causal_tile or sharp_softmax or $(
        )negative_slots or long_prompt_config or split_steps or choose or $(
        )test_extend_kv_splits[1] or test_whole_prompts_read_their_own_kv[default]" \
    > "$logs/attention" 2>&1 &
attention=$!
"$python" -m pytest -q -p no:cacheprovider --noconftest -m gpu tests/gpu/test_small_linear.py \
    tests/gpu/test_triton_attention.py tests/gpu/test_batch_invariance.py \
    -k compile_for_hopper > "$logs/hopper" 2>&1 &
hopper=$!

status=0
for check in decode invariance attention hopper; do
    wait "${!check}"
    code=$?
    echo "== kernel checks: $check (exit $code) =="
    cat "$logs/$check"
    if [ "$code" != 0 ] && [ "$status" = 0 ]; then
        status=$code
    fi
done
exit "$status"
