"""Which Triton kernel variants an engine compiles after start-up, while it serves (issue 6).

Triton compiles a kernel once per specialisation of its arguments (dtypes, 16-byte
alignment, integers equal to 1 or divisible by 16, constexprs), the first time a launch
needs it: 0.3-1 s on a fresh machine, and a disk-cache load in every new process. The engine's
start-up (warm-up steps, CUDA-graph capture) is meant to compile everything a workload needs,
so a request never waits for the compiler. This builds the engine of the article's runs
(Qwen2.5-1.5B shape, random weights, 4,096 KV blocks, LPM, 8,192-token budget) on a fresh
Triton cache, then serves workload-shaped requests (S: ShareGPT lengths, all at once; P and Q:
4,096-token prefixes with suffixes of any length) and lists every compile during serving,
with its specialisation and how long the launch waited for it.

    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=src:scripts python3 scripts/serving_compiles_gpu.py \
        --sharegpt .gpu/sharegpt3000.json --out $OUT/serving_compiles.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch
from triton import knobs

MODEL = "random:qwen2.5-1.5b"


class CompileLog:
    """Triton's JIT hooks: one record per compile (an in-process cache miss), by phase."""

    def __init__(self) -> None:
        self.phase = "start-up"
        self.records: list[dict[str, Any]] = []
        self._started: dict[str, float] = {}
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key: str, repr: str, **_: Any) -> None:
        self._started[key] = time.perf_counter()

    def _after(self, *, key: str, repr: str, fn: Any, **_: Any) -> None:
        started = self._started.pop(key, time.perf_counter())
        self.records.append({"phase": self.phase, "kernel": fn.name, "variant": repr,
                             "seconds": round(time.perf_counter() - started, 3)})

    def during(self, phase: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["phase"] == phase]


def prefix_prompts(rng: random.Random, num: int, output_len: int,
                   prefix_len: int = 4096) -> list[tuple[list[int], Any]]:
    """P/Q-shaped: 4,096-token prefixes (four, so prefixes repeat and are cached) and suffixes
    of random lengths, not only multiples of 16."""
    from kvtier import SamplingParams
    prefixes = [[rng.randrange(1000, 30_000) for _ in range(prefix_len)] for _ in range(4)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return [(prefixes[i % 4] + [rng.randrange(1000, 30_000)
                                for _ in range(rng.randrange(1, 400))], params)
            for i in range(num)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharegpt", default=None, help="a ShareGPT dump (default: packaged)")
    parser.add_argument("--num-sharegpt", type=int, default=300)
    parser.add_argument("--out", default="serving_compiles.json")
    parser.add_argument("--model", default=MODEL, help="CPU smoke check: random:tiny-llama")
    args = parser.parse_args()
    log = CompileLog()  # before the engine: start-up's compiles are counted too
    from profile_gpu_engine import sharegpt_shaped  # scripts/ is on sys.path

    from kvtier import LLM
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("card:", card, flush=True)
    started = time.perf_counter()
    llm = LLM(args.model, num_gpu_blocks_override=4096, max_num_batched_tokens=8192,
              max_num_seqs=256, scheduling_policy="lpm")
    startup_s = time.perf_counter() - started
    rng = random.Random(0)
    workloads = {
        "S": sharegpt_shaped(args.num_sharegpt, rng, args.sharegpt),
        "P/Q": prefix_prompts(rng, 48, 16, 4096 if args.model == MODEL else 1024),
    }
    report: dict[str, Any] = {"card": card, "startup_s": startup_s,
                              "startup_compiles": len(log.during("start-up"))}
    for name, requests in workloads.items():
        log.phase = name
        started = time.perf_counter()
        llm.generate([p for p, _ in requests], [s for _, s in requests])
        report[name] = {"seconds": round(time.perf_counter() - started, 2),
                        "compiles": log.during(name)}
    print(f"start-up: {startup_s:.1f} s, {report['startup_compiles']} compiles", flush=True)
    for name in workloads:
        compiles = report[name]["compiles"]
        print(f"{name}: {report[name]['seconds']} s, {len(compiles)} compiles while serving "
              f"({sum(c['seconds'] for c in compiles):.2f} s)", flush=True)
        for record in compiles:
            print(f"  {record['seconds']:6.3f} s  {record['variant']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
