"""The slowest requests of each run in a lab results.json: their index in the workload's
request order and their TTFT, so the tail of two configurations can be compared request by
request (a p99 of 256 requests is decided by its three slowest).

    python3 scripts/lab_ttft_tail.py results/lab/<experiment>/results.json [--top 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtier.lab.records import read_results_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a lab run's results.json")
    parser.add_argument("--top", type=int, default=8, help="requests per run (default 8)")
    args = parser.parse_args()
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    try:
        records = read_results_json(Path(args.results))
    except (OSError, ValueError) as exc:
        print(f"lab_ttft_tail: {args.results}: {exc}", file=sys.stderr)
        return 2
    for record in records:
        if (record.metric("failed") or 0) > 0:
            print(f"{record.server} / {record.workload} / repeat {record.repeat}: failed "
                  "requests, so indices are not request order: skipped")
            continue
        slowest = sorted(enumerate(record.ttfts_ms), key=lambda item: -item[1])[:args.top]
        print(f"{record.server} / {record.workload} / repeat {record.repeat}: "
              + ", ".join(f"#{index} {ms:.1f}" for index, ms in slowest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
