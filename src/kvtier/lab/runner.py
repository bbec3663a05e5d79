"""Run an experiment: each server configuration in turn, every workload against it.

Order: configuration-major, so every server starts once. A server that fails to start, or dies,
is recorded against its workloads and the next configuration runs; a workload that cannot run
is recorded and the next one runs. Results are written after every run (results.json, .csv), so
an interrupted experiment keeps what it measured; the report and plots come at the end.
The same seeded Workload object is sent to every configuration (built once per tokenizer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from kvtier.bench.client import run_benchmark
from kvtier.bench.config import build_workload
from kvtier.bench.datasets import TokenizerLike, Workload
from kvtier.bench.tokenizer import resolve_tokenizer
from kvtier.lab.experiment import Experiment, ExperimentError, ServerSpec, WorkloadSpec
from kvtier.lab.progress import TaskFactory
from kvtier.lab.records import (
    FAILED,
    OK,
    SERVER_FAILED,
    RunRecord,
    path_problem,
    write_results_csv,
    write_results_json,
)
from kvtier.lab.server import (
    RunningServer,
    ServerStartError,
    running_server,
    scrape_gauge,
    slug,
)
from kvtier.lab.server_stats import summarize
from kvtier.utils.host_counters import HostCounters, ProcessTreeCPU

Log = Callable[[str], None]
T = TypeVar("T")

STEAL_WORTH_SAYING = 0.005
"""A run's log line names the machine's steal share from here up (every run records it)."""

_FLAG_CHECK = """
import contextlib, io, json, sys
from kvtier.cli import build_parser
for flags in json.load(sys.stdin):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(["serve", *flags])
        print(json.dumps(None))
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        print(json.dumps(lines[-1] if lines else "rejected"))
"""


def _run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, less one duplicate traceback. `kvtier lab`'s SIGTERM/SIGHUP handler
    raises `Interrupted` (a KeyboardInterrupt) wherever the signal lands. Landing in a task's
    step, it is stored in that task as well as raised out of the loop, and asyncio logged the
    stored copy when the task was collected: "Task exception was never retrieved" and a
    traceback, under the lab's one-line "interrupted" message."""

    async def main() -> T:
        loop = asyncio.get_running_loop()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if not isinstance(context.get("exception"), KeyboardInterrupt):
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)
        return await coroutine

    return asyncio.run(main())


@dataclass
class LabRun:
    """An experiment's outcome: where it was written and every record."""

    experiment: Experiment
    out_dir: Path
    records: list[RunRecord] = field(default_factory=list)
    wall_s: float = 0.0


def check_engine_flags(experiment: Experiment) -> None:
    """Let `kvtier serve`'s own parser judge every kvtier configuration's flags, up front.

    Runs in a subprocess (the lab never imports the engine); raises ExperimentError naming the
    configuration and argparse's complaint.
    """
    kvtier = [(i, s) for i, s in enumerate(experiment.servers) if s.kind == "kvtier"]
    if not kvtier:
        return
    flags = [[*(["--model", s.model] if s.model else []), *s.engine] for _, s in kvtier]
    done = subprocess.run([sys.executable, "-c", _FLAG_CHECK], input=json.dumps(flags),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ExperimentError(f"could not check the servers' flags: {done.stderr[-500:]}")
    for (i, spec), problem in zip(kvtier, done.stdout.splitlines(), strict=True):
        message = json.loads(problem)
        if message is not None:
            raise ExperimentError(f"servers[{i}] ({spec.name!r}).engine: kvtier serve rejects "
                                  f"{' '.join(spec.engine)!r}: {message}")


def check_dataset_files(experiment: Experiment) -> None:
    """Refuse a workload whose `dataset_path` is no file, before any server starts for runs
    that could only fail (as `kvtier bench` refuses it). Only the workloads selected run, so
    only theirs are checked: `--workloads P` needs no copy of S's file."""
    for workload in experiment.workloads:
        path = workload.fields.get("dataset_path")
        if path is not None and not Path(path).is_file():
            problem = "is a directory" if Path(path).is_dir() else "no such file"
            raise ExperimentError(f"workload {workload.name!r}: dataset_path {path!r}: "
                                  f"{problem}")


class _Runner:
    """Mutable state of one experiment run: records, caches, output paths."""

    def __init__(self, experiment: Experiment, out_dir: Path, new_task: TaskFactory | None,
                 log: Log) -> None:
        self.experiment = experiment
        self.out_dir = out_dir
        self.new_task = new_task
        self.log = log
        self.lab = LabRun(experiment, out_dir)
        self._tokenizers: dict[tuple[str | None, str | None], TokenizerLike] = {}
        self._workloads: dict[tuple[str, int], Workload] = {}
        self._log_names: set[str] = set()
        self.repeat = 0

    def save(self) -> None:
        write_results_json(self.out_dir / "results.json", experiment_summary(self.experiment),
                           self.lab.records)
        write_results_csv(self.out_dir / "results.csv", self.lab.records)

    def add(self, record: RunRecord) -> None:
        record.repeat = self.repeat
        self.lab.records.append(record)
        self.save()

    def run_server(self, spec: ServerSpec, workloads: Sequence[WorkloadSpec],
                   log_name: str | None = None) -> None:
        """Start one configuration, run `workloads`, stop it; failures become records."""
        # `{repeat}` in an engine flag value or a launch command (a disk tier's directory)
        # gives each repetition its own, so a repeat is not served from what the previous one
        # left behind.
        tag = str(self.repeat)
        spec = dataclasses.replace(
            spec, engine=tuple(arg.replace("{repeat}", tag) for arg in spec.engine),
            launch=spec.launch.replace("{repeat}", tag) if spec.launch else spec.launch)
        self.log(f"[lab] starting {spec.name!r} ({spec.kind})")
        try:
            with running_server(spec, self.out_dir / "logs",
                                self._unique_log_name(log_name or spec.name)) as server:
                self.log(f"[lab] {spec.name!r} healthy at {server.base_url} after "
                         f"{server.start_seconds:.1f} s")
                warm_up(server.base_url)
                pool = device_kv_tokens(server)
                for workload in workloads:
                    if server.process is not None and server.process.poll() is not None:
                        self.add(self._failure(spec, workload, SERVER_FAILED, "server exited "
                                               f"with code {server.process.returncode}", server))
                        continue
                    self.add(self.run_workload(server, workload, pool))
        except ServerStartError as exc:
            self.log(f"[lab] {exc}")
            for workload in workloads:
                self.add(self._failure(spec, workload, SERVER_FAILED, str(exc), None))

    def _unique_log_name(self, name: str) -> str:
        """`slug(name)`, numbered where an earlier server of this run had the same slug:
        distinct names ("CPU tier", "cpu-tier") must not write (and point at) one log file."""
        base = candidate = slug(name)
        number = 1
        while candidate in self._log_names:
            number += 1
            candidate = f"{base}-{number}"
        self._log_names.add(candidate)
        return candidate

    def _failure(self, spec: ServerSpec, workload: WorkloadSpec, status: str, error: str,
                 server: RunningServer | None) -> RunRecord:
        return RunRecord(server=spec.name, workload=workload.name, status=status, error=error,
                         server_log=str(server.log_path or "") if server else "",
                         prefix_working_set_tokens=workload.prefix_working_set_tokens())

    def run_workload(self, server: RunningServer, workload: WorkloadSpec,
                     pool: int | None) -> RunRecord:
        """One benchmark; setup errors (tokenizer, dataset, server) become a failed record."""
        spec = server.spec
        label = f"{spec.name} × {workload.name}"
        start = time.perf_counter()
        host = HostCounters.snapshot()
        try:
            tokenizer = self.tokenizer(server, workload)
            config = workload.bench_config(server.base_url,
                                           label=workload.fields.get("label") or spec.name)
            key = (workload.name, id(tokenizer))
            if key not in self._workloads:
                self._workloads[key] = build_workload(config, tokenizer)
            if spec.reset_path is not None:
                reset_cache(server.base_url, spec.reset_path)
            progress = self.new_task(label) if self.new_task else None
            cpu_before = (ProcessTreeCPU.snapshot(server.process.pid)
                          if server.process is not None else None)
            result = _run_async(run_benchmark(config, progress, tokenizer=tokenizer,
                                              workload=self._workloads[key]))
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the experiment
            self.log(f"[lab] {label}: failed: {type(exc).__name__}: {exc}")
            record = self._failure(spec, workload, FAILED, f"{type(exc).__name__}: {exc}",
                                   server)
            record.run_s = time.perf_counter() - start
            return record
        stats = summarize(result.server_metrics)
        record = RunRecord.from_result(
            spec.name, workload.name, result, kvtier=stats.to_json() if stats else None,
            prefix_working_set_tokens=workload.prefix_working_set_tokens(),
            device_kv_tokens=pool, server_start_s=server.start_seconds,
            run_s=time.perf_counter() - start, server_log=str(server.log_path or ""))
        record.status = OK if result.completed else FAILED
        record.machine_steal_share = HostCounters.snapshot().since(host).summary()["steal_share"]
        cpu_after = (ProcessTreeCPU.snapshot(server.process.pid)
                     if cpu_before is not None and server.process is not None else None)
        if cpu_before is not None and cpu_after is not None:
            record.server_cpu = cpu_after.since(cpu_before)
            self.log(f"[lab] {label}: server CPU s {record.server_cpu['cpu_s']}, busiest "
                     f"threads {record.server_cpu['busiest_threads']}")
        steal = record.machine_steal_share
        self.log(f"[lab] {label}: {result.completed} ok, {result.failed} failed, "
                 f"{result.request_throughput:.2f} req/s, mean TTFT "
                 f"{result.latency_stats['ttft']['mean']:.0f} ms ({record.run_s:.1f} s"
                 + (f", {steal:.1%} of the machine's CPU stolen"
                    if steal is not None and steal >= STEAL_WORTH_SAYING else "") + ")")
        return record

    def tokenizer(self, server: RunningServer, workload: WorkloadSpec) -> TokenizerLike:
        explicit = workload.fields.get("tokenizer") or self.experiment.tokenizer
        model = server.spec.model or served_model(server.base_url)
        key = (explicit, model)
        if key not in self._tokenizers:
            self._tokenizers[key] = resolve_tokenizer(explicit, model)
        return self._tokenizers[key]


def _log_name(server: str, workload: str | None, repeat: int) -> str | None:
    parts = [server] + ([workload] if workload else []) + ([f"run{repeat + 1}"] if repeat else [])
    return "--".join(parts) if len(parts) > 1 else None


def warm_up(base_url: str) -> None:
    """One short completion, so first-request costs (lazy init, allocator) hit no workload.

    Best effort: a server that rejects it will show the problem in the runs themselves.
    """
    model = served_model(base_url)
    body = {"prompt": "Hello, my name is", "max_tokens": 4, "stream": False,
            **({"model": model} if model else {})}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(base_url + "/v1/completions", json=body, timeout=120.0)


class CacheResetError(RuntimeError):
    """The server did not answer its cache reset (`reset_path`) with 2xx."""


def reset_cache(base_url: str, path: str) -> None:
    """POST the server's cache reset, so the run starts cold (its KV tiers included only where
    the path asks, e.g. kvtier's `/reset_prefix_cache?reset_external=true`)."""
    try:
        response = httpx.post(base_url + path, timeout=120.0)
    except httpx.HTTPError as exc:
        raise CacheResetError(f"cache reset {path}: {type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        raise CacheResetError(f"cache reset {path} answered HTTP {response.status_code}: "
                              f"{response.text.strip()[:200]}")


def served_model(base_url: str) -> str | None:
    """The first id at /v1/models (None when the server does not say)."""
    try:
        data = httpx.get(base_url + "/v1/models", timeout=10.0).json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return str(data[0]["id"]) if data else None


def device_kv_tokens(server: RunningServer) -> int | None:
    """The device KV pool in tokens: given in the spec, else kvtier's gauge × block size."""
    spec = server.spec
    if spec.device_kv_tokens is not None:
        return spec.device_kv_tokens
    blocks = scrape_gauge(server.base_url, "kvtier:kv_cache_total_blocks")
    if blocks is None:
        return None
    block_size = int(spec.engine_value("block-size") or spec.block_size)
    return int(blocks) * block_size


def run_experiment(experiment: Experiment, out_dir: Path, new_task: TaskFactory | None = None,
                   log: Log = print, check_flags: bool = True) -> LabRun:
    """Run every configuration × workload into `out_dir` and write results, report, plots."""
    from kvtier.lab.report import write_report

    start = time.perf_counter()
    check_dataset_files(experiment)
    if check_flags:
        check_engine_flags(experiment)
    runner = _Runner(experiment, out_dir, new_task, log)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        runner.save()
    except OSError as exc:
        raise ExperimentError(f"cannot write the report directory {str(out_dir)!r}: "
                              f"{path_problem(out_dir, exc)}") from exc
    try:
        if experiment.restart_per_workload:
            # Workload-major: the runs compared with each other are adjacent in time, so a
            # shared machine's load drift does not masquerade as a configuration's effect.
            for workload in experiment.workloads:
                for repeat in range(experiment.repeats):
                    runner.repeat = repeat
                    for spec in experiment.servers:
                        runner.run_server(spec, [workload],
                                          log_name=_log_name(spec.name, workload.name, repeat))
        else:
            for repeat in range(experiment.repeats):
                runner.repeat = repeat
                for spec in experiment.servers:
                    runner.run_server(spec, experiment.workloads,
                                      log_name=_log_name(spec.name, None, repeat))
    finally:
        runner.lab.wall_s = time.perf_counter() - start
        write_report(runner.lab)
    return runner.lab


def experiment_summary(experiment: Experiment) -> dict[str, Any]:
    """The experiment as plain data (for results.json and the report)."""
    return {"name": experiment.name, "source": experiment.source,
            "description": experiment.description,
            "servers": [{"name": s.name, "kind": s.kind, "engine": list(s.engine),
                         "model": s.model, "base_url": s.base_url, "launch": s.launch}
                        for s in experiment.servers],
            "workloads": [{"name": w.name, **w.fields} for w in experiment.workloads]}
