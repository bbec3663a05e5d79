"""Tokens per streamed chunk in a lab run's results.json, per run (repeats apart), also for
results written before the lab's table had the row (`records.stream_tokens_per_chunk`): when a
server's front end falls behind its engine, a stream's queued tokens leave in fewer, larger SSE
chunks, and the benchmark's ITL (vLLM's definition: the gap between two chunks) grows with
them, while the engine's own step gaps (KVTIER_STEP_TRACE) do not.

    python3 scripts/lab_stream_chunks.py results/lab/<experiment>/results.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvtier.lab.records import read_results_json, stream_tokens_per_chunk


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    try:
        records = read_results_json(path)
    except (OSError, ValueError) as exc:
        print(f"lab_stream_chunks: {path}: {exc}", file=sys.stderr)
        return 2
    for record in records:
        output = int(record.metric("total_output_tokens") or 0)
        gaps = len(record.itls_ms)  # a completed stream's chunks after its first
        per_chunk = stream_tokens_per_chunk(output, int(record.metric("completed") or 0), gaps)
        print(f"{record.server} / {record.workload} / repeat {record.repeat}: "
              f"{output} tokens, {gaps} gaps between chunks, "
              f"{per_chunk or float('nan'):.3f} tokens per chunk after the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
