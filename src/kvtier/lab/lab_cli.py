"""`kvtier lab`: run an experiment file or preset, list presets, sweep a knob, reprint a table.

    kvtier lab EXPERIMENT.toml | PRESET [--output DIR] [--servers A,B] [--workloads X,Y]
    kvtier lab list
    kvtier lab sweep --knob KNOB --values 1,2,4 [--base PRESET|FILE] [--workload W]
                     [--off SERVER] [--on SERVER] [--output DIR]
    kvtier lab show DIR            the tables of a finished (or interrupted) run

The report directory defaults to results/lab/<experiment>-<date>/ (results.json, results.csv,
report.md, plots/, logs/). Exit codes: 0 every run succeeded, 1 some run failed (its record
says why; the others are kept), 2 a malformed experiment or bad options.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

USAGE = __doc__.split("\n\n")[1]


def add_lab_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `kvtier lab`; its own forms are parsed by the handler (see USAGE)."""
    parser = sub.add_parser("lab", help="experiments: server configs × workloads, reports, "
                            "sweeps (kvtier lab list)", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="EXPERIMENT.toml | PRESET | list | sweep ... | show DIR")
    return parser


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier lab", usage=USAGE)
    parser.add_argument("target", help="experiment TOML file or preset name")
    _common(parser)
    parser.add_argument("--servers", default=None, help="comma-separated subset to run")
    parser.add_argument("--workloads", default=None, help="comma-separated subset to run")
    return parser


def _sweep_parser() -> argparse.ArgumentParser:
    from kvtier.lab.sweep import KNOBS

    parser = argparse.ArgumentParser(prog="kvtier lab sweep", description=(
        "Vary one pressure knob with the tier off and on; plot where the tier starts to pay."))
    parser.add_argument("--knob", required=True, choices=KNOBS)
    parser.add_argument("--values", required=True, help="comma-separated integers, e.g. 2,4,8")
    parser.add_argument("--base", default="seed-cpu", help="preset or experiment file")
    parser.add_argument("--workload", default=None, help="default: the first prefix_repetition")
    parser.add_argument("--off", default=None, help="tier-off server (default: the first)")
    parser.add_argument("--on", default=None, help="tier-on server (default: the second)")
    _common(parser)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="report directory (default "
                        "results/lab/<name>-<date>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_lab(args: argparse.Namespace) -> int:
    """The `kvtier lab` handler."""
    from kvtier.lab.experiment import ExperimentError

    argv: list[str] = list(args.lab_args)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0 if argv else 2
        if argv[0] in ("list", "show") and any(a in ("-h", "--help") for a in argv[1:]):
            print(USAGE)  # not a directory named --help, nor the list
            return 0
        if argv[0] == "list":
            return _list()
        if argv[0] == "show":
            return _show(argv[1:])
        if argv[0] == "sweep":
            return _sweep(_sweep_parser().parse_args(argv[1:]))
        return _run(_run_parser().parse_args(argv))
    except ExperimentError as exc:
        print(f"kvtier lab: error: {exc}", file=sys.stderr)
        return 2


def _list() -> int:
    import textwrap

    from kvtier.lab.experiment import list_presets

    for name, description in list_presets().items():
        print(name)
        print(textwrap.fill(" ".join(description.split()), width=96, initial_indent="    ",
                            subsequent_indent="    "))
    return 0


def _out_dir(output: str | None, name: str) -> Path:
    if output:
        return Path(output)
    return Path("results") / "lab" / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _subset(items: Sequence[Any], wanted: str | None, what: str) -> tuple[Any, ...]:
    from kvtier.lab.experiment import ExperimentError

    if not wanted:
        return tuple(items)
    names = [n.strip() for n in wanted.split(",")]
    known = {item.name: item for item in items}
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ExperimentError(f"--{what}: {name!r} is named twice")
        if name not in known:
            raise ExperimentError(f"--{what}: no {what[:-1]} named {name!r} (have: "
                                  f"{', '.join(known)})")
    return tuple(known[n] for n in names)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so started servers are stopped on the way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    for other in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the teardown
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def _execute(experiment: Any, out_dir: Path, no_progress: bool) -> Any:
    """Run the experiment; on Ctrl-C, SIGTERM or SIGHUP stop its servers and keep the results.

    Without a handler SIGTERM/SIGHUP would end Python without unwinding, leaving the servers
    the lab started (each in its own session) running.
    """
    from kvtier.lab.progress import bench_progress
    from kvtier.lab.runner import run_experiment

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, _interrupt)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with bench_progress(not no_progress and sys.stderr.isatty()) as new_task:
            return run_experiment(experiment, out_dir, new_task=new_task, log=log)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"kvtier lab: interrupted ({signal.Signals(signum).name}); servers stopped, the "
              f"runs that finished are in {out_dir}", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(ns: argparse.Namespace) -> int:
    from kvtier.lab.experiment import load_experiment
    from kvtier.lab.table import format_tables

    experiment = load_experiment(ns.target)
    experiment = experiment.replace(
        servers=_subset(experiment.servers, ns.servers, "servers"),
        workloads=_subset(experiment.workloads, ns.workloads, "workloads"))
    out_dir = _out_dir(ns.output, experiment.name)
    lab = _execute(experiment, out_dir, ns.no_progress)
    servers = [s.name for s in experiment.servers]
    print(format_tables(lab.records, servers, [w.name for w in experiment.workloads]))
    print(f"\nkvtier lab: {experiment.name}: {len(lab.records)} runs in {lab.wall_s:.1f} s; "
          f"report {out_dir / 'report.md'}")
    return 0 if all(r.succeeded for r in lab.records) else 1


def _sweep(ns: argparse.Namespace) -> int:
    from kvtier.lab.experiment import load_experiment
    from kvtier.lab.sweep import parse_values, plan_sweep, write_sweep_outputs

    start = time.perf_counter()
    plan = plan_sweep(load_experiment(ns.base), ns.knob, parse_values(ns.values), off=ns.off,
                      on=ns.on, workload=ns.workload)
    out_dir = _out_dir(ns.output, plan.experiment.name)
    lab = _execute(plan.experiment, out_dir, ns.no_progress)
    print(write_sweep_outputs(plan, lab.records, out_dir))
    print(f"\nkvtier lab sweep: {len(lab.records)} runs in {time.perf_counter() - start:.1f} s;"
          f" report {out_dir / 'sweep.md'}")
    return 0 if all(r.succeeded for r in lab.records) else 1


def _show(argv: list[str]) -> int:
    import json

    from kvtier.lab.experiment import ExperimentError
    from kvtier.lab.records import read_results_json
    from kvtier.lab.table import format_tables

    if len(argv) != 1:
        raise ExperimentError("usage: kvtier lab show DIR (a lab report directory)")
    path = Path(argv[0]) / "results.json"
    if not path.is_file():
        raise ExperimentError(f"{path} does not exist")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))["experiment"]
        servers = [s["name"] if isinstance(s, dict) else s for s in meta["servers"]]
        workloads = [w["name"] if isinstance(w, dict) else w for w in meta["workloads"]]
        records = read_results_json(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise ExperimentError(f"{path}: not a kvtier lab results.json "
                              f"({type(exc).__name__}: {exc})") from exc
    print(format_tables(records, servers, workloads))
    return 0
