"""Time `Sampler.sample_async` on the GPU for decode batches with random sampling (issue 6).

Rows sampled one by one cost ~10 kernel launches each (temperature, top-k, a full-vocabulary
sort for top-p, softmax, multinomial): at batch 256 that is milliseconds of host time a step,
with the GPU waiting. This times the sampler over Qwen2.5's vocabulary (151,936) at batch 1,
32 and 256 for common settings, as host time (the call) and as the call plus its kernels
(synchronised), and optionally the same for an older sampler module given by path (the
device command puts the previous tree's sampler.py there) in the same run.

    PYTHONPATH=src python3 scripts/bench_sampler_gpu.py [--old .old/sampler_195a162.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from typing import Any

import torch

from kvtier.types import SamplingParams

VOCAB = 151_936
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "t0.7 top-p 0.8 top-k 20": SamplingParams(temperature=0.7, top_p=0.8, top_k=20),
    "t1.0 top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "t1.0": SamplingParams(temperature=1.0),
    "t0.8 seeded": SamplingParams(temperature=0.8, seed=1),
    "the same + repetition 1.1 (Qwen2.5's config)": SamplingParams(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1),
}
PROMPT_LEN = 1024
"""Prompt tokens each penalised row has seen."""


def load_sampler(path: str | None) -> Any:
    if path is None:
        from kvtier.runner.sampler import Sampler
        return Sampler
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sampler"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Sampler


def time_sampler(sampler_cls: Any, batch: int, params: SamplingParams,
                 repeat: int = 20) -> dict[str, float]:
    device = torch.device("cuda")
    sampler = sampler_cls(device, seed=0)
    logits = torch.randn(batch, VOCAB, device=device) * 3
    ids = [f"r{i}" for i in range(batch)]
    rows = [params] * batch
    contexts = None
    if params.has_penalties:
        contexts = [(list(range(i, i + PROMPT_LEN)), []) for i in range(batch)]
    host, total = [], []
    for i in range(repeat + 3):
        work = logits.clone()
        torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = sampler.sample_async(work, ids, rows, contexts)
        launched = time.perf_counter()
        torch.cuda.synchronize()
        finished = time.perf_counter()
        if contexts is not None:  # the outputs grow as the engine's do (state kept, not rebuilt)
            for (_, output), token in zip(contexts, tokens.tolist(), strict=True):
                output.append(token)
        if i >= 3:
            host.append(launched - started)
            total.append(finished - started)
    return {"host_ms": 1e3 * statistics.median(host), "total_ms": 1e3 * statistics.median(total)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default=None, help="path of an older sampler.py to compare")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print("card:", torch.cuda.get_device_name(), flush=True)
    samplers = {"new": load_sampler(None)}
    if args.old:
        samplers["old"] = load_sampler(args.old)
    report: dict[str, Any] = {"card": torch.cuda.get_device_name()}
    for name, params in SETTINGS.items():
        for batch in (1, 32, 256):
            for which, cls in samplers.items():
                result = time_sampler(cls, batch, params)
                report[f"{name} | b{batch} | {which}"] = result
                print(f"{name:45s} b{batch:<4d} {which:4s} host {result['host_ms']:8.3f} ms"
                      f"  with kernels {result['total_ms']:8.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
