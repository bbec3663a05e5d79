"""Compare the engine process's cProfiles of two served runs (KVTIER_ENGINE_PROFILE_DIR).

Prints each run's functions with the most own time, then the functions whose own time grew
the most from the first run to the second, per engine step when both profiles name the
step counts (`--steps A B`, e.g. from the lab's "Engine steps" row): what the second
configuration's engine spends its extra host time on.

    python3 scripts/engine_profile_diff.py /tmp/prof/off /tmp/prof/cpu --steps 2541 2533
"""

from __future__ import annotations

import argparse
import pstats
import re
import sys
from pathlib import Path

Key = tuple[str, int, str]


def load(path: Path) -> pstats.Stats:
    """One .prof file, or every engine-*.prof under a directory (merged)."""
    if not path.exists():
        sys.exit(f"{path}: no such file or directory")
    files = sorted(path.glob("engine-*.prof")) if path.is_dir() else [path]
    if not files:
        sys.exit(f"no engine-*.prof under {path}")
    stats = pstats.Stats(str(files[0]))
    for extra in files[1:]:
        stats.add(str(extra))
    return stats


def own_times(stats: pstats.Stats) -> dict[Key, tuple[int, float]]:
    """(calls, own seconds) per function. A builtin's name can hold its address ("<function
    Event.synchronize at 0x7f...>"), which differs between processes: it is dropped."""
    times: dict[Key, tuple[int, float]] = {}
    for (file, line, name), value in stats.stats.items():  # type: ignore[attr-defined]
        key = (file, line, re.sub(r" at 0x[0-9a-f]+>$", ">", name))
        calls, own = times.get(key, (0, 0.0))
        times[key] = (calls + value[1], own + value[2])
    return times


def label(key: Key) -> str:
    file, line, name = key
    return f"{Path(file).name}:{line}({name})" if line else name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--steps", type=int, nargs=2, metavar=("FIRST", "SECOND"),
                        help="engine steps of each run: report microseconds per step")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    runs = [own_times(load(args.first)), own_times(load(args.second))]
    steps = args.steps or (1, 1)
    unit = "us/step" if args.steps else "s"
    scale = 1e6 if args.steps else 1.0
    for name, run, num_steps in zip((args.first, args.second), runs, steps, strict=True):
        total = sum(t for _, t in run.values())
        print(f"== {name}: {total:.2f} s of own time ({scale * total / num_steps:.1f} {unit})")
        for key, (calls, own) in sorted(run.items(), key=lambda kv: -kv[1][1])[:args.rows]:
            print(f"{scale * own / num_steps:12.1f} {unit} {calls:9d} calls  {label(key)}")
    first, second = runs
    growth = {key: second.get(key, (0, 0.0))[1] / steps[1] - first.get(key, (0, 0.0))[1] / steps[0]
              for key in first.keys() | second.keys()}
    print(f"== own time, second minus first ({unit})")
    for key, delta in sorted(growth.items(), key=lambda kv: -abs(kv[1]))[:args.rows]:
        calls = (first.get(key, (0, 0.0))[0], second.get(key, (0, 0.0))[0])
        print(f"{scale * delta:+12.1f} {unit}  calls {calls[0]:>9d} -> {calls[1]:<9d} {label(key)}")


if __name__ == "__main__":
    main()
