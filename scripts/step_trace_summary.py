"""Print what each run in KVTIER_STEP_TRACE files did to its decoding streams: steps by kind,
their mean time, the decode gaps' percentiles weighted by tokens (an engine-side view of the
served p99 ITL), and how many prompt steps the gaps held (`kvtier.utils.step_trace`).

    python3 scripts/step_trace_summary.py off.jsonl cpu.jsonl [--idle-s 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from kvtier.utils.step_trace import read_step_trace, split_runs, summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="KVTIER_STEP_TRACE files")
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="a pause longer than this starts a new run (default 5)")
    parser.add_argument("--json", help="also write the summaries to this file")
    args = parser.parse_args()
    if args.idle_s <= 0:
        parser.error(f"--idle-s must be > 0, got {args.idle_s}")
    summaries = {}
    for path in args.traces:
        try:
            steps = read_step_trace(path)
        except (OSError, ValueError) as exc:
            print(f"step_trace_summary: {exc}", file=sys.stderr)
            return 2
        for index, run in enumerate(split_runs(steps, args.idle_s)):
            summary = summarize(run)
            summaries[f"{path}#{index}"] = dataclasses.asdict(summary)
            print(f"== {path} run {index}: {len(run)} steps over {run[-1].t - run[0].t:.1f} s")
            print("  steps " + ", ".join(f"{kind} {count} ({summary.mean_ms[kind]:.2f} ms)"
                                         for kind, count in sorted(summary.steps.items())))
            print(f"  decode gaps over {summary.decode_tokens} tokens: p50 "
                  f"{summary.gap_ms_p50:.2f}, p90 {summary.gap_ms_p90:.2f}, p99 "
                  f"{summary.gap_ms_p99:.2f}, max {summary.gap_ms_max:.2f} ms")
            if summary.tier_loads or summary.tier_stores:
                print(f"  tier: {summary.tier_loads} loads, {summary.tier_stores} stores; "
                      f"steps with prompt tokens {summary.mean_prompt_ms_with_stores:.2f} ms "
                      f"where stores started, {summary.mean_prompt_ms_without_stores:.2f} ms "
                      "elsewhere")
            print("  prompt steps in a gap: " + ", ".join(
                f"{k}: {tokens} tokens ({summary.mean_gap_ms_by_prompt_steps[k]:.1f} ms)"
                for k, tokens in summary.prompt_steps_in_gap.items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summaries, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
