"""`kvtier lab` end to end on random:tiny-llama: two kvtier servers started by the lab, a short
prefix-pressure workload and a failing configuration; the report directory must be complete.
The servers' caches are reset before the run (`reset_path`), the warm-up's KV included."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXPERIMENT = """
name = "e2e"
model = "random:tiny-llama"
[bench]
seed = 0
ignore_eos = true
temperature = 0.0
[[servers]]
name = "prefix cache only"
engine = { num_gpu_blocks_override = 24, kv_tier_chunk_tokens = 32 }
startup_timeout_s = 180
reset_path = "/reset_prefix_cache?reset_external=true"
[[servers]]
name = "+ cpu tier"
engine = { num_gpu_blocks_override = 24, kv_tier_chunk_tokens = 32, kv_tier = ["cpu:16MiB"] }
startup_timeout_s = 180
reset_path = "/reset_prefix_cache?reset_external=true"
[[servers]]
name = "broken"
launch = "echo no such server on {port}; exit 7"
[[workloads]]
name = "P"
dataset_name = "prefix_repetition"
prefix_repetition_prefix_len = 96
prefix_repetition_suffix_len = 16
prefix_repetition_num_prefixes = 8
prefix_repetition_output_len = 4
num_prompts = 16
max_concurrency = 2
"""


def lab(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "lab", *argv],
                          capture_output=True, text=True, timeout=300)


def test_lab_run_writes_the_report_with_plots(tmp_path: Path):
    path = tmp_path / "e2e.toml"
    path.write_text(EXPERIMENT)
    out = tmp_path / "report"
    done = lab(str(path), "--output", str(out), "--no-progress")
    assert done.returncode == 1, done.stderr  # the broken configuration failed; others ran
    assert "== P ==" in done.stdout and "Requests/sec" in done.stdout
    assert "Mean TTFT" in done.stdout and "+ cpu tier vs prefix cache only" in done.stdout
    assert "broken: server-failed" in done.stdout and "exited with code 7" in done.stdout
    rows = {r["server"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["prefix cache only"]["status"] == rows["+ cpu tier"]["status"] == "ok"
    assert rows["broken"]["status"] == "server-failed"
    assert int(rows["+ cpu tier"]["completed"]) == 16
    assert int(rows["+ cpu tier"]["hit_tokens_cpu"]) > 0  # the tier served evicted prefixes
    assert int(rows["+ cpu tier"]["device_kv_tokens"]) == 24 * 16
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 3
    report = (out / "report.md").read_text()
    assert "| Mean TTFT |" in report and "## Regime" in report
    plots = {p.name for p in (out / "plots").iterdir()}
    assert plots == {"ttft_cdf_p.png", "itl_p.png", "throughput.png", "regime_map.png"}
    assert {p.name for p in (out / "logs").iterdir()} == {
        "prefix-cache-only.log", "cpu-tier.log", "broken.log"}
    for log in ("prefix-cache-only.log", "cpu-tier.log"):
        text = (out / "logs" / log).read_text()
        assert "prefix cache reset: " in text and " tier entries forgotten" in text, log


def test_malformed_experiment_names_the_field(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(EXPERIMENT.replace("num_prompts = 16", "num_prompts = -1"))
    done = lab(str(path))
    assert done.returncode == 2
    assert "workloads[0]: num_prompts must be >= 1, got -1" in done.stderr
    path.write_text(EXPERIMENT.replace("kv_tier_chunk_tokens = 32 }",
                                       "kv_tier_chunk_tokens = 32, no_such_flag = 1 }", 1))
    done = lab(str(path))
    assert done.returncode == 2
    assert "servers[0] ('prefix cache only').engine" in done.stderr
    assert "--no-such-flag" in done.stderr


def test_lab_list_names_the_presets():
    done = lab("list")
    assert done.returncode == 0
    names = {line for line in done.stdout.splitlines() if line and not line.startswith(" ")}
    assert names == {"seed-cpu", "seed-gpu", "smoke"}
