#!/usr/bin/env bash
# The redis tier on the GPU machine of the `device` tool: its unit tests and the tier stack's
# end-to-end tests with redis on CUDA, then two replicas of the Qwen2.5-1.5B shape (bf16) on
# one Redis (scripts/bench_redis_replicas.py). The card has no redis-server: .gpu/redis holds
# this repo's box's binary and the libraries it links beyond the C runtime (glibc >= 2.34);
# .whl/ holds the redis and hiredis wheels. Outputs under $out. To fill them (this box: Debian
# 12, glibc 2.36; the binary asks for glibc >= 2.34):
#   mkdir -p .gpu/redis/lib && cp /usr/bin/redis-check-rdb .gpu/redis/redis-server
#   for l in $(ldd /usr/bin/redis-server | awk '/=>/ {print $3}' | grep -v -E 'libc\.|libm\.|libstdc|libgcc_s'); do
#       cp -L "$l" .gpu/redis/lib/; done
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl redis hiredis
#
#   bash scripts/device_redis.sh [--skip-tests]      (carry [".whl", ".gpu/redis"])
set -uo pipefail
source scripts/device_env.sh
redis-server --version || exit 1
python3 -c "import redis, hiredis; print('redis', redis.__version__, 'hiredis', hiredis.__version__)"
status=0
[ "${1:-}" = "--skip-tests" ] || KVTIER_TEST_TINY_MODEL=random:tiny-qwen2 timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/unit/tiers/test_redis_store.py tests/unit/tiers/test_stores.py \
    tests/e2e/test_tiered_engine.py -k "redis or replica or Redis" > "$out/redis_tests.log" 2>&1 \
    || status=1
[ -f "$out/redis_tests.log" ] && tail -n 6 "$out/redis_tests.log"
for tokens in ${REDIS_BENCH_TOKENS:-4096 16384}; do  # 8 documents, then 4 of the longer
    python3 scripts/bench_redis_replicas.py --model random:qwen2.5-1.5b --dtype bfloat16 \
        --documents $(( tokens > 4096 ? 4 : 8 )) --document-tokens $tokens --redis-size 16GiB \
        --out "$out/redis_replicas_$tokens.json" --trace-dir "$out/traces-$tokens" \
        > "$out/redis_replicas_$tokens.log" 2>&1 \
        || status=1
    grep -v Warning "$out/redis_replicas_$tokens.log" | tail -n 12
done
exit $status
