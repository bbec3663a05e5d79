"""server.py and runner.py against fake OpenAI servers started through `launch` templates.

The fakes (fake_openai.py) stream instantly, so a whole experiment runs in seconds: a kvtier-like
server (its /metrics has kvtier: counters), one that fails every third request, and one whose
command exits at once. Failures must be recorded while the other runs go on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.lab.experiment import Experiment, ExperimentError, ServerSpec, WorkloadSpec
from kvtier.lab.runner import check_engine_flags, run_experiment
from kvtier.lab.server import (
    ServerStartError,
    running_server,
    server_command,
    slug,
    stop_process,
)

FAKE = Path(__file__).with_name("fake_openai.py")
TOKENIZER = "Qwen/Qwen2.5-1.5B-Instruct"


def fake(name: str, *flags: str) -> ServerSpec:
    command = f"{sys.executable} {FAKE} --port {{port}} {' '.join(flags)}"
    return ServerSpec(name=name, launch=command, startup_timeout_s=30)


def workload(name: str = "R", num_prompts: int = 6) -> WorkloadSpec:
    return WorkloadSpec(name, {"dataset_name": "random", "random_input_len": 32,
                               "random_output_len": 4, "num_prompts": num_prompts,
                               "max_concurrency": 2})


def test_server_command_forms():
    kv = ServerSpec("a", engine=("--num-gpu-blocks-override", "8"), model="random:tiny-llama")
    argv = server_command(kv, 1234)
    assert argv[1:4] == ["-m", "kvtier.cli", "serve"]
    assert argv[4:] == ["--model", "random:tiny-llama", "--num-gpu-blocks-override", "8",
                        "--host", "127.0.0.1", "--port", "1234"]
    launch = ServerSpec("b", launch="serve {model} --host {host} --port {port}", model="m")
    assert server_command(launch, 7) == ["/bin/sh", "-c", "serve m --host 127.0.0.1 --port 7"]
    assert slug("+ CPU tier / 16GiB") == "cpu-tier-16gib"


def test_running_server_is_healthy_then_torn_down(tmp_path: Path):
    with running_server(fake("f"), tmp_path) as server:
        assert server.process is not None and server.process.poll() is None
        assert server.start_seconds > 0 and server.base_url.startswith("http://127.0.0.1:")
        process = server.process
    assert process.poll() is not None  # SIGTERM reached the launcher's child too
    assert (tmp_path / "f.log").read_text().startswith("$ /bin/sh -c")


def test_a_server_that_exits_reports_its_log(tmp_path: Path):
    spec = ServerSpec("dies", launch="echo cannot start on {port}; exit 3", startup_timeout_s=10)
    with (pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*cannot start on"),
          running_server(spec, tmp_path)):
        pass


def test_stop_process_kills_what_ignores_sigterm():
    process = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                "signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE,
                               start_new_session=True)
    assert process.stdout is not None and process.stdout.readline()
    start = time.perf_counter()
    assert stop_process(process, grace_s=0.5) == -9
    assert time.perf_counter() - start < 5


def test_a_second_ctrl_c_during_teardown_still_kills_the_server():
    """Users press Ctrl-C again while a slow server stops: that KeyboardInterrupt used to
    land in the SIGTERM grace wait and skip the SIGKILL, leaving the server (in its own
    session, so the terminal's SIGINT never reaches it) running."""
    process = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                                "signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE,
                               start_new_session=True)
    assert process.stdout is not None and process.stdout.readline()

    def second_ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, second_ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            stop_process(process, grace_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        assert process.wait(timeout=5) == -9
    finally:
        process.kill()


def test_experiment_keeps_going_past_failures_and_writes_everything(tmp_path: Path):
    experiment = Experiment(
        name="unit", tokenizer=TOKENIZER,
        servers=(fake("kvtier-like", "--kvtier"), fake("flaky", "--fail-every", "3"),
                 ServerSpec("broken", launch="exit 3 # {port}", startup_timeout_s=10)),
        workloads=(workload("R"), workload("R2", 3)))
    messages: list[str] = []
    lab = run_experiment(experiment, tmp_path, log=messages.append)
    got = {(r.server, r.workload): r for r in lab.records}
    assert len(got) == 6
    ok = got[("kvtier-like", "R")]
    assert ok.status == "ok" and ok.result["completed"] == 6
    assert ok.kvtier is not None and ok.kvtier["tier_hit_tokens"]["cpu"] > 0
    assert ok.device_kv_tokens == 64 * 16  # kvtier:kv_cache_total_blocks × block size
    if sys.platform.startswith("linux"):  # each run says how much CPU the hypervisor took
        assert ok.machine_steal_share is not None and 0 <= ok.machine_steal_share <= 1
        # ... and how much the server's processes used: the launcher's shell and the fake
        # server under it (a few requests take it under the kernel's 10 ms tick, so no
        # amount is asserted: test_host_counters checks the accounting)
        assert ok.server_cpu is not None
        roles = ok.server_cpu["cpu_s"]
        assert "server" in roles and any(r.startswith("child ") for r in roles)
        assert all(v >= 0 for v in roles.values())
        assert any(m.startswith("[lab] kvtier-like × R: server CPU s {") for m in messages)
    flaky = got[("flaky", "R")]
    assert flaky.status == "ok" and flaky.result["failed"] >= 1 and "HTTP 500" in flaky.error
    assert got[("broken", "R")].status == "server-failed"
    assert "exited with code 3" in got[("broken", "R2")].error
    assert any("broken" in m for m in messages)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 6 and "machine_steal_share" in rows[0]
    if sys.platform.startswith("linux"):
        row = next(r for r in rows if (r["server"], r["workload"]) == ("kvtier-like", "R"))
        assert float(row["server_cpu_s"]) >= 0 and float(row["server_children_cpu_s"]) >= 0
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 6
    report = (tmp_path / "report.md").read_text()
    assert "### R" in report and "server-failed" in report
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {
        "ttft_cdf_r.png", "itl_r.png", "throughput.png", "regime_map.png"}


def test_servers_whose_names_slug_alike_keep_their_own_logs(tmp_path: Path):
    """"Fake A" and "fake-a" are different names but one slug: the second server's log used
    to overwrite the first's, whose record then pointed at the other server's log."""
    servers = (fake("Fake A", "--fail-every", "1"), fake("fake-a"))
    lab = run_experiment(Experiment(name="unit", tokenizer=TOKENIZER, servers=servers,
                                    workloads=(workload("R", 2),)),
                         tmp_path, log=lambda _: None, check_flags=False)
    logs = {r.server: r.server_log for r in lab.records}
    assert len(set(logs.values())) == 2, logs
    for name, log in logs.items():
        assert ("--fail-every 1" in Path(log).read_text()) == (name == "Fake A")


def test_restart_per_workload_runs_workload_major_on_fresh_servers(tmp_path: Path):
    experiment = Experiment(name="unit", tokenizer=TOKENIZER, restart_per_workload=True,
                            servers=(fake("s1", "--kvtier"), fake("s2")),
                            workloads=(workload("A", 2), workload("B", 2)))
    messages: list[str] = []
    lab = run_experiment(experiment, tmp_path, log=messages.append)
    assert [(r.server, r.workload, r.status) for r in lab.records] == [
        ("s1", "A", "ok"), ("s2", "A", "ok"), ("s1", "B", "ok"), ("s2", "B", "ok")]
    assert sum("starting" in m for m in messages) == 4
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {
        "s1-a.log", "s2-a.log", "s1-b.log", "s2-b.log"}


def test_repeats_interleave_configurations_and_the_report_shows_medians(tmp_path: Path):
    experiment = Experiment(name="unit", tokenizer=TOKENIZER, restart_per_workload=True,
                            repeats=2,
                            servers=(fake("s1", "--kvtier"), fake("s2", "# r{repeat}")),
                            workloads=(workload("A", 2),))
    lab = run_experiment(experiment, tmp_path, log=lambda _: None)
    assert [(r.server, r.repeat, r.status) for r in lab.records] == [
        ("s1", 0, "ok"), ("s2", 0, "ok"), ("s1", 1, "ok"), ("s2", 1, "ok")]
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {
        "s1-a.log", "s2-a.log", "s1-a-run2.log", "s2-a-run2.log"}
    # `{repeat}` in a launch command (or an engine flag value) is the run's index
    assert "# r0" in (tmp_path / "logs" / "s2-a.log").read_text().splitlines()[0]
    assert "# r1" in (tmp_path / "logs" / "s2-a-run2.log").read_text().splitlines()[0]
    report = (tmp_path / "report.md").read_text()
    assert "- s1: median of 2 runs; req/s" in report and "- s2: median of 2 runs" in report
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [row["repeat"] for row in rows] == ["0", "0", "1", "1"]


def test_engine_flags_are_checked_by_kvtiers_own_parser():
    good = Experiment(name="x", servers=(ServerSpec("a", engine=("--max-num-seqs", "4")),),
                      workloads=(workload(),))
    check_engine_flags(good)
    bad = good.replace(servers=(good.servers[0], ServerSpec("b", engine=("--bogus-flag", "1"))))
    with pytest.raises(ValueError, match=r"servers\[1\] \('b'\)\.engine: .*--bogus-flag"):
        check_engine_flags(bad)


@pytest.mark.parametrize("path, problem", [("/no/such.json", "no such file"),
                                           ("/", "is a directory")])
def test_a_missing_dataset_file_is_refused_before_any_server_starts(tmp_path: Path, path: str,
                                                                     problem: str):
    """It used to be found only at run time, after every server had been started for runs that
    could only fail. Only the selected workloads' files count: `--workloads R` runs without
    a copy of S's file."""
    marker = tmp_path / "started"
    started = ServerSpec("s", launch=f"touch {marker} && {fake('s').launch}",
                         startup_timeout_s=30)
    sharegpt = WorkloadSpec("S", {"dataset_name": "sharegpt", "dataset_path": path,
                                  "num_prompts": 2})
    experiment = Experiment(name="x", servers=(started,), workloads=(workload(), sharegpt))
    with pytest.raises(ExperimentError, match=rf"workload 'S': dataset_path '{path}': {problem}"):
        run_experiment(experiment, tmp_path / "out", log=lambda _: None, check_flags=False)
    assert not marker.exists() and not (tmp_path / "out").exists()
    run = run_experiment(experiment.replace(workloads=(workload(num_prompts=2),)),
                         tmp_path / "out", log=lambda _: None, check_flags=False)
    assert marker.exists() and [r.status for r in run.records] == ["ok"]


def test_reset_path_is_posted_before_every_run_and_a_refused_reset_fails_the_run(
        tmp_path: Path):
    """One server, two workloads, two repeats: four runs, each after a reset of its own (the
    fake logs how many requests it had seen: the warm-up's, then each run's six). A server
    that refuses the reset gets failed runs naming the path and the status, no benchmark."""
    resets = dataclasses.replace(fake("resets"), reset_path="/reset_prefix_cache")
    refuses = dataclasses.replace(fake("refuses", "--reset-status", "409"),
                                  reset_path="/reset_prefix_cache")
    experiment = Experiment(name="unit", tokenizer=TOKENIZER, servers=(resets, refuses),
                            workloads=(workload("R"), workload("R2")), repeats=2)
    lab = run_experiment(experiment, tmp_path, log=lambda _: None)
    logs = sorted((tmp_path / "logs").glob("resets*.log"))
    seen = [line for log in logs for line in log.read_text().splitlines()
            if line.startswith("reset after")]
    assert seen == ["reset after 1 requests", "reset after 7 requests"] * 2, seen
    by_server = {name: [r for r in lab.records if r.server == name]
                 for name in ("resets", "refuses")}
    assert [r.status for r in by_server["resets"]] == ["ok"] * 4
    assert [r.status for r in by_server["refuses"]] == ["failed"] * 4
    assert all("cache reset /reset_prefix_cache answered HTTP 409: reset answer" in r.error
               for r in by_server["refuses"])
