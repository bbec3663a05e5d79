"""Where the engine's host time goes on workload P (issue 6): cProfile of the in-process replay.

Runs `profile_gpu_engine.p_replay` under cProfile and prints the functions with the most own
time and cumulative time. cProfile slows Python down, so read shares, not absolute times.

    PYTHONPATH=src python3 scripts/host_profile_gpu.py --num-prompts 200 --tier cpu:16GiB
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

from profile_gpu_engine import p_replay  # scripts/ is on sys.path when this runs as a script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--tier", action="append", default=[])
    parser.add_argument("--rows", type=int, default=45)
    parser.add_argument("--callees", action="append", default=[],
                        help="also print what these functions call, e.g. _try_tier_load")
    args = parser.parse_args()
    p_replay({}, 64, tuple(args.tier))  # warm-up: Triton compiles, graphs, tier buffers
    profiler = cProfile.Profile()
    report: dict = {}
    profiler.enable()
    p_replay(report, args.num_prompts, tuple(args.tier))
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.rows)
        print(out.getvalue(), flush=True)
    for name in args.callees:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_callees(name)
        print(out.getvalue(), flush=True)


if __name__ == "__main__":
    main()
