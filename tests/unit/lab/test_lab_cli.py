"""lab_cli.py: `kvtier lab` run as a user runs it, against fake servers it starts itself."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.unit.lab.test_runner import FAKE, TOKENIZER

EXPERIMENT = f"""
name = "cli"
[[servers]]
name = "slow"
launch = "{sys.executable} {FAKE} --port {{port}} --delay-ms 200"
startup_timeout_s = 30
[[workloads]]
name = "quick"
dataset_name = "random"
num_prompts = 2
random_input_len = 16
random_output_len = 2
tokenizer = "{TOKENIZER}"
[[workloads]]
name = "long"
dataset_name = "random"
num_prompts = 2
random_input_len = 16
random_output_len = 200
tokenizer = "{TOKENIZER}"
"""


def lab(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvtier.cli", "lab", *argv, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_stops_the_started_server_and_keeps_the_finished_runs(tmp_path: Path,
                                                                      signum: int):
    (tmp_path / "e.toml").write_text(EXPERIMENT)
    out = tmp_path / "out"
    process = lab(str(tmp_path / "e.toml"), "--output", str(out))
    assert process.stderr is not None
    url, lines = None, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if match := re.search(r"healthy at (http://\S+)", line):
            url = match.group(1)
        if "quick:" in line:  # the first workload finished; the long one is running
            break
    assert url is not None, "".join(lines)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "interrupted" in err
    with pytest.raises(httpx.ConnectError):  # the server the lab started is gone
        httpx.get(url + "/health", timeout=2)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["workload"], r["status"]) for r in runs] == [("quick", "ok")]
    assert (out / "report.md").is_file()


def test_an_output_path_that_is_a_file_is_one_clear_line(tmp_path: Path):
    (tmp_path / "e.toml").write_text(
        'name = "x"\n[[servers]]\nname = "given"\nbase_url = "http://127.0.0.1:9"\n'
        '[[workloads]]\nname = "w"\nnum_prompts = 1\n')
    (tmp_path / "taken").write_text("")
    for output in ("taken", "taken/sub"):
        process = lab(str(tmp_path / "e.toml"), "--output", str(tmp_path / output))
        _, err = process.communicate(timeout=60)
        assert process.returncode == 2, err
        assert "Traceback" not in err
        assert f"{str(tmp_path / 'taken')!r} is a file, not a directory" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--workloads", "w,w"], "--workloads: 'w' is named twice"),
    (["--servers", "given,given"], "--servers: 'given' is named twice"),
    (["--workloads", "nope"], "--workloads: no workload named 'nope' (have: w)"),
])
def test_bad_subsets_are_refused(tmp_path: Path, argv: list[str], message: str):
    (tmp_path / "e.toml").write_text(
        'name = "x"\n[[servers]]\nname = "given"\nbase_url = "http://127.0.0.1:9"\n'
        '[[workloads]]\nname = "w"\nnum_prompts = 1\n')
    process = lab(str(tmp_path / "e.toml"), *argv, "--output", str(tmp_path / "out"))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "why"), [
    ("{", "JSONDecodeError"),
    ('{"runs": []}', "KeyError: 'experiment'"),
    ('{"experiment": {"servers": [], "workloads": []}, "runs": [{"bogus": 1}]}', "TypeError"),
])
def test_show_of_a_malformed_results_json_names_the_file(tmp_path: Path, content: str,
                                                         why: str):
    (tmp_path / "results.json").write_text(content)
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "lab", "show", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    err = done.stderr
    assert done.returncode == 2, err
    assert "Traceback" not in err
    assert f"{tmp_path / 'results.json'}: not a kvtier lab results.json ({why}" in err


@pytest.mark.parametrize("argv", [["show", "--help"], ["show", "-h"], ["list", "--help"]])
def test_help_of_show_and_list_prints_the_usage(argv: list[str],
                                                capsys: pytest.CaptureFixture[str]):
    import argparse

    from kvtier.lab.lab_cli import USAGE, run_lab

    assert run_lab(argparse.Namespace(lab_args=argv)) == 0
    out, err = capsys.readouterr()
    assert out.strip() == USAGE.strip() and "kvtier lab show DIR" in out
    assert not err
