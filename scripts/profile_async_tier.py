"""Where the cpu tier's time goes on workload S under async scheduling (issue 6).

With four HTTP front ends (`--api-server-count 4`) S ran at ~102 req/s tier-off and ~78 with
the cpu tier, whose runner steps took ~1-1.5 ms longer, although S reuses nothing. With
async scheduling the host's turn is the step's critical path, so this replays S in-process
(1,000 ShareGPT-shaped requests at once, Qwen2.5-1.5B shape, bf16, 4,096 blocks, as the
lab's server) with the async pipeline, tier-off and with the tier, and times the tier's
calls; then cProfiles one tier run.

    PYTHONPATH=src:scripts python3 scripts/profile_async_tier.py --sharegpt .gpu/sharegpt3000.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import time
from typing import Any

import torch
from profile_gpu_engine import PhaseTimer, sharegpt_shaped  # scripts/ is on sys.path

from kvtier import LLM

TIER_CALLS = ("poll", "store_lookahead", "on_evict", "on_request_freed", "_store_chunks",
              "on_blocks_cached")


def build(tiers: tuple[str, ...], model: str) -> LLM:
    extra: dict[str, Any] = {"kv_tiers": tiers} if tiers else {}
    return LLM(model, dtype="bfloat16" if torch.cuda.is_available() else "float32",
               num_gpu_blocks_override=4096, max_num_batched_tokens=8192, max_num_seqs=256,
               scheduling_policy="lpm", async_scheduling=True, **extra)


def replay(llm: LLM, num_prompts: int, seed: int, path: str | None,
           profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    requests = sharegpt_shaped(num_prompts, random.Random(seed), path)
    engine = llm.engine
    timer = PhaseTimer()
    if engine.tiers is not None:
        for name in TIER_CALLS:
            if hasattr(engine.tiers, name):
                timer.wrap(engine.tiers, name, f"tier.{name}")
    if hasattr(engine.scheduler, "store_ahead"):
        timer.wrap(engine.scheduler, "store_ahead", "scheduler.store_ahead")
    timer.wrap(engine.scheduler, "schedule", "scheduler.schedule")
    timer.wrap(engine.runner, "launch", "runner.launch")
    steps_before = engine.stats.num_steps
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    outputs = llm.generate([r[0] for r in requests], [r[1] for r in requests])
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - started
    num_steps = engine.stats.num_steps - steps_before
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"wall_s": round(wall, 3), "req_s": round(num_prompts / wall, 2),
            "output_tok_s": round(tokens / wall), "steps": num_steps,
            "ms_per_step": round(1e3 * wall / max(num_steps, 1), 3),
            "calls_us_per_step": {name: round(1e6 * total / max(num_steps, 1), 1)
                                  for name, total in timer.totals.most_common()},
            "tier_stats": (None if engine.tiers is None else {
                k: v for k, v in vars(engine.tiers.stats).items()
                if isinstance(v, int | float) and v})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharegpt", default=None, help="a ShareGPT dump (default: packaged)")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--tier", default="cpu:16GiB")
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"card": (torch.cuda.get_device_name()
                                       if torch.cuda.is_available() else "cpu")}
    print(report, flush=True)
    for label, tiers in (("tier-off", ()), ("cpu tier", (args.tier,))):
        llm = build(tiers, args.model)
        replay(llm, 16, seed=99, path=args.sharegpt)  # warm-up
        runs = [replay(llm, args.num_prompts, seed=seed, path=args.sharegpt)
                for seed in (1, 2)]
        report[label] = runs
        print(label, json.dumps(runs), flush=True)
        if tiers:
            profiler = cProfile.Profile()
            replay(llm, args.num_prompts, seed=3, path=args.sharegpt, profiler=profiler)
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(r"tiers|block_pool", 25)
            report["profile"] = text.getvalue()
            print(text.getvalue(), flush=True)
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
