"""A simulated device for host-overhead experiments on the CPU (issue 6), in every process.

With this directory first on PYTHONPATH and KVTIER_SIM_STEP_S set, Python imports it at
start-up in the parent and in a spawned engine process alike, and the model runner stops
computing: a step "runs on the device" for KVTIER_SIM_STEP_S seconds (plus
KVTIER_SIM_TOKEN_S per scheduled token, 0 unless set) after its launch, each
sampled request gets a fixed token, and the host waits only where it reads the tokens (the
runner's `launch(...).result()` where that split exists, else inside `execute`). Everything
else (scheduler, KV manager, tiers, outputs, the engine process, the HTTP server) runs for
real, so engine-core designs can be compared for how much host work they hide.

    KVTIER_SIM_STEP_S=0.003 PYTHONPATH=scripts/simulated_device:src \
        .venv/bin/python -m kvtier.cli lab EXPERIMENT.toml
"""
import os
import time

_STEP = os.environ.get("KVTIER_SIM_STEP_S")
_PER_TOKEN = float(os.environ.get("KVTIER_SIM_TOKEN_S", "0"))
if _STEP:
    from kvtier.runner import model_runner as _mr
    from kvtier.types import ModelRunnerOutput as _Out

    _busy = [0.0]

    class _SimPending:
        def __init__(self, out, ready):
            self.out, self.ready = out, ready

        def result(self):
            delay = self.ready - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            return _Out(self.out)

    def _launch(self, step):
        start = max(time.perf_counter(), _busy[0])
        _busy[0] = start + (float(_STEP) + _PER_TOKEN * step.num_scheduled_tokens
                            if step.requests else 0.0)
        return _SimPending({s.request_id: 1000 + len(s.token_ids) % 7
                            for s in step.requests if s.sample}, _busy[0])

    if hasattr(_mr.ModelRunner, "launch"):
        _mr.ModelRunner.launch = _launch
    else:
        _mr.ModelRunner.execute = lambda self, step: _launch(self, step).result()
