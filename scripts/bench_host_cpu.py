"""Host time per engine turn with the model stubbed out (issue 6): what the GPU waits for.

On the H200 a decode step of workload P took ~3 ms on the runner but ~4.7 ms per turn of the
engine process: scheduling, tier bookkeeping, state updates, detokenisation and the pickled
update to the front end ran between steps while the GPU idled. This drives the engine core's
turn (commands in, `engine.step()`, one pickled `CoreUpdate` out) on workload P's shape with a
runner that returns a token per sampled request at once, so everything measured is host work.
The embedded model stands in for Qwen (the KV layout only changes tier copy sizes).

    .venv/bin/python scripts/bench_host_cpu.py [--tier cpu:2GiB] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pickle
import pstats
import random
import time
from typing import Any

import torch

# scripts/ is on sys.path when run as a script
from profile_gpu_engine import PhaseTimer, sharegpt_shaped

from kvtier import LLM, SamplingParams
from kvtier.engine.core_messages import AddRequest
from kvtier.engine.engine_core import CommandInbox, EngineCore
from kvtier.runner.model_runner import PendingOutput
from kvtier.types import SchedulerOutput


def stub_launch(step: SchedulerOutput) -> PendingOutput:
    sampled = [s for s in step.requests if s.sample]
    return PendingOutput([s.request_id for s in sampled],
                         torch.tensor([1000 + len(s.token_ids) % 7 for s in sampled]))


def run(args: argparse.Namespace) -> dict:
    extra = {"kv_tiers": (args.tier,)} if args.tier else {}
    llm = LLM(None, num_gpu_blocks_override=args.num_blocks, max_num_batched_tokens=8192,
              max_num_seqs=256, scheduling_policy="lpm", **extra)
    engine = llm.engine
    engine.runner.launch = stub_launch  # type: ignore[method-assign]
    # As on CUDA, where decode graphs exist: steps carry prefill chunks or decodes.
    engine.scheduler.separate_prefill_steps = True
    if engine.tiers is not None:  # the stub's instant "prefills" must not teach the cost model
        engine.tiers.cost.observe_prefill = lambda *a: None  # type: ignore[method-assign]
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.scheduler, "update_from_output", "update")
    timer.wrap(engine.outputs, "detokenize", "detokenize")
    timer.wrap(engine.outputs, "make_delta", "make_delta")
    sent = [0]

    def emit(update: Any) -> None:
        started = time.perf_counter()
        sent[0] += len(pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL))
        timer.totals["pickle_update"] += time.perf_counter() - started

    core = EngineCore(engine, CommandInbox(), emit, separate_process=True)
    rng = random.Random(0)
    if args.sharegpt:
        queued = sharegpt_shaped(args.num_prompts, rng)
        concurrency = args.num_prompts  # workload S: every request at once
    else:
        prefixes = [[rng.randrange(1000, 30_000) for _ in range(args.prefix_len)]
                    for _ in range(args.num_prefixes)]
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        queued = [(prefixes[rng.randrange(args.num_prefixes)]
                   + [rng.randrange(1000, 30_000) for _ in range(256)], params)
                  for _ in range(args.num_prompts)]
        concurrency = 64
    in_flight = done = turns = 0
    ids = iter(range(10**9))
    started = time.perf_counter()
    while done < args.num_prompts:
        update = core._update(0)
        while in_flight < concurrency and queued:
            prompt, params = queued.pop()
            core._apply(update, [AddRequest(f"r{next(ids)}", prompt, params,
                                            time.monotonic())])
            in_flight += 1
        # The core's synchronous turn (EngineCore._loop): step, then one update out.
        launched = core._launch(update)
        core._deliver(update, core._complete(launched) if launched is not None else [])
        update.snapshot = core._snapshot()
        emit(update)
        turns += 1
        finished = sum(1 for o in update.outputs if o.finished)
        done += finished
        in_flight -= finished
    wall = time.perf_counter() - started
    if engine.tiers is not None:
        hits = dict(engine.tiers.stats.hit_tokens)
        engine.shutdown()
    else:
        hits = {}
    return {"turns": turns, "wall_s": round(wall, 3), "ms_per_turn": 1e3 * wall / turns,
            "phase_ms_per_turn": {k: round(1e3 * v / turns, 4) for k, v in timer.totals.items()},
            "update_bytes_per_turn": sent[0] // turns, "tier_hit_tokens": hits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tier", default=None, help="e.g. cpu:2GiB")
    parser.add_argument("--num-prompts", type=int, default=320)
    parser.add_argument("--num-prefixes", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=4096)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--sharegpt", action="store_true",
                        help="workload S's shape (all --num-prompts at once) instead of P's")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not args.profile:
        print(json.dumps(run(args), indent=1))
        return
    profiler = cProfile.Profile()
    profiler.enable()
    result = run(args)
    profiler.disable()
    print(json.dumps(result, indent=1))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(35)
    print(out.getvalue())


if __name__ == "__main__":
    main()
