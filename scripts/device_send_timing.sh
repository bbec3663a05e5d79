#!/usr/bin/env bash
# With one front end the core's loop writes every update to its pipe itself. How long do those
# writes take, and does the pipe ever fill (a front end that lags blocking the core)? On the
# GPU machine of the `device` tool: src/ copied to /tmp/instrsrc with the engine process's
# send timed (benchmarks/single-send-timing.toml runs S and P there); the timing lines go to
# $out/send-timing.txt. Carry [".whl", ".gpu"].
set -uo pipefail
rm -rf /tmp/instrsrc && cp -r src /tmp/instrsrc
python3 - <<'PY'
path = "/tmp/instrsrc/kvtier/engine/engine_process.py"
source = open(path).read()
old = "    core = EngineCore(engine, inbox, conns[0].send if fanout is None else fanout.emit,"
new = '''    import time as _time
    _send = conns[0].send
    _stats = [0, 0.0, 0, 0.0, 0.0, _time.perf_counter()]  # n, total, n>1ms, max, >1ms total

    def _timed_send(update):
        t = _time.perf_counter()
        _send(update)
        d = _time.perf_counter() - t
        _stats[0] += 1
        _stats[1] += d
        if d > 0.001:
            _stats[2] += 1
            _stats[4] += d
        _stats[3] = max(_stats[3], d)
        if _stats[0] % 500 == 0:
            logger.warning("send-timing n=%d total=%.3fs mean=%.1fus slow>1ms=%d (%.3fs) "
                           "max=%.1fms wall=%.1fs", _stats[0], _stats[1],
                           1e6 * _stats[1] / _stats[0], _stats[2], _stats[4], 1e3 * _stats[3],
                           _time.perf_counter() - _stats[5])

    core = EngineCore(engine, inbox, _timed_send if fanout is None else fanout.emit,'''
assert source.count(old) == 1, "engine_process.py changed: update this script"
open(path, "w").write(source.replace(old, new))
PY
gunzip -kf .gpu/sharegpt3000.json.gz
bash scripts/device_lab.sh benchmarks/single-send-timing.toml | grep -E "^==|Requests/sec|decode-only"
out=${OUT:-/tmp/out}  # device_lab.sh made it
for log in /tmp/lab-single-send-timing/logs/*.log; do
    echo "== $log"
    grep send-timing "$log" | tail -n 3
done | tee "$out/send-timing.txt"
