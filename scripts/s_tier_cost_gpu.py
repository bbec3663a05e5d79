"""What a cpu tier costs workload S, which never reuses a prefix (issue 6), on the GPU.

Through the lab (HTTP, the engine in its own process) S + cpu served 65.2 req/s against 70.0
tiers off (median of three interleaved runs each, fifteenth session, call 3), with no token
ever loaded from the tier. This replays S in-process (no front end): tiers off, + cpu with
the scheduler's second lookahead walk (before the fifteenth session) and + cpu as it is, in
alternating order; with --profile then one + cpu replay under cProfile, printing where the
tier's host time goes.

    PYTHONPATH=src:scripts python3 scripts/s_tier_cost_gpu.py --sharegpt .gpu/sharegpt3000.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from typing import Any

import torch
from profile_gpu_engine import p_replay  # scripts/ is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharegpt", default="", help="ShareGPT dump (default: packaged)")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tier", default="cpu:16GiB")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="then one + cpu replay under cProfile")
    parser.add_argument("--callees", action="append", default=[],
                        help="print what these functions call in the profiled replay")
    args = parser.parse_args()
    print("card:", torch.cuda.get_device_name(), flush=True)
    p_replay({}, 100, (), sharegpt=args.sharegpt)  # warm-up: kernels compile
    def walk_twice(engine: Any) -> None:  # the lookahead before the fifteenth session
        engine.scheduler.lookahead_after_store_ahead = True

    configs = [("off", (), None), ("cpu_walk_twice", (args.tier,), walk_twice),
               ("cpu", (args.tier,), None)]
    runs = []
    for repeat in range(args.repeats):  # each process run drifts slower: alternate the order
        for label, tiers, configure in (configs if repeat % 2 == 0 else configs[::-1]):
            report: dict = {}
            p_replay(report, args.num_prompts, tiers, sharegpt=args.sharegpt, label=label,
                     configure=configure)
            runs.append({"repeat": repeat, "label": label, **next(iter(report.values()))})
            torch.cuda.empty_cache()
    for label, _, _ in configs:
        rates = [r["req_s"] for r in runs if r["label"] == label]
        print(f"{label:16s} req/s {[round(r, 2) for r in rates]}", flush=True)
    if not args.profile:
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"card": torch.cuda.get_device_name(), "runs": runs}, handle,
                          indent=1)
        return
    profiler = cProfile.Profile()
    profiled: dict = {}
    profiler.enable()
    p_replay(profiled, args.num_prompts, (args.tier,), sharegpt=args.sharegpt)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(40)
        print(out.getvalue(), flush=True)
    for name in args.callees:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_callees(name)
        print(out.getvalue(), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"card": torch.cuda.get_device_name(), "runs": runs,
                       "profiled": profiled}, handle, indent=1)


if __name__ == "__main__":
    main()
