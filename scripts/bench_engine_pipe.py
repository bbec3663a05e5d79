"""CPU cost of the engine pipe's wire format (issue 6): pickling one step's `CoreUpdate`
(the engine loop's work every step) and unpickling it (the front end's update thread).

Each step carries a delta per running request; most only stream new tokens and text. This
times dump and load per delta for batches of plain deltas, a few of them first or last
deltas, against the same deltas pickled the default way (one object and its __dict__ each),
which is what the pipe carried before 151e3a4. On the nvidia-h200's S runs the two changes
moved the decode-only step from 3.7-4.2 ms to 3.2-3.8 ms (BENCHMARKS.md).

    .venv/bin/python scripts/bench_engine_pipe.py [--batches 8 64 256] [--repeats 300]
"""

from __future__ import annotations

import argparse
import pickle
import time

from kvtier.engine.core_messages import CoreUpdate
from kvtier.types import OutputDelta, RequestMetrics


class _DefaultPickledDelta(OutputDelta):
    """The same delta, pickled as any dataclass is (copyreg: the class and its __dict__)."""

    __reduce__ = object.__reduce__  # pickle then takes object's own protocol-2 path


class _DefaultPickledUpdate(CoreUpdate):
    """The same update, pickled as any dataclass is: each delta an object of its own."""

    __reduce__ = object.__reduce__  # pickle then takes object's own protocol-2 path


def step_deltas(batch: int, cls: type[OutputDelta] = OutputDelta) -> list[OutputDelta]:
    """A decode step's deltas: one token each, every 32nd request finishing."""
    metrics = RequestMetrics(arrival_time=1.0, num_prompt_tokens=230)
    return [cls(f"cmpl-{i:032x}-0", [1000 + i], " word", i % 32 == 31,
                "length" if i % 32 == 31 else None, None,
                metrics if i % 32 == 31 else None,
                final_text="a whole answer" if i % 32 == 31 else None)
            for i in range(batch)]


def per_delta_us(fn, repeats: int, batch: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats / batch * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    print("| batch | format | dump µs/delta | load µs/delta | bytes/delta |")
    print("|---:|---|---:|---:|---:|")
    for batch in args.batches:
        for name, update in (
                ("default dataclass", _DefaultPickledUpdate(None, 0, 1.0, outputs=step_deltas(
                    batch, _DefaultPickledDelta))),
                ("columns (ca4604a)", CoreUpdate(None, 0, 1.0, outputs=step_deltas(batch)))):
            data = pickle.dumps(update, pickle.HIGHEST_PROTOCOL)
            dump = per_delta_us(lambda u=update: pickle.dumps(u, pickle.HIGHEST_PROTOCOL),
                                args.repeats, batch)
            load = per_delta_us(lambda d=data: pickle.loads(d), args.repeats, batch)
            print(f"| {batch} | {name} | {dump:.2f} | {load:.2f} | {len(data) / batch:.0f} |")


if __name__ == "__main__":
    main()
