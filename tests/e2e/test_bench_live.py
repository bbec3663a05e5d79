"""`kvtier bench` against a live `kvtier serve --model random:tiny-llama` started by the test.

What the client counted must equal what the server counted over the same window (requests,
prompt tokens, generated tokens); bad input gives one clear line; a server that rejects some
requests, or dies mid-run, yields failed requests and a finished report, not a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvtier.bench.prometheus import parse_metrics_text
from kvtier.lab.experiment import ServerSpec
from kvtier.lab.server import RunningServer, running_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 192
NUM_BLOCKS = 128
"""2,048 tokens of KV: 8 running requests of at most 192 tokens need 96 blocks. The CPU's
default pool (262,144 blocks) took seconds of each server's start."""


def tiny_server(name: str) -> ServerSpec:
    return ServerSpec(name, model="random:tiny-llama", startup_timeout_s=180,
                      engine=("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
                              "--num-gpu-blocks-override", str(NUM_BLOCKS)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tiny_server("live"), tmp_path_factory.mktemp("logs")) as running:
        yield running


def bench(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "--disable-tqdm",
                           "--temperature", "0", *argv], capture_output=True, text=True,
                          timeout=timeout_s)


def scrape(base_url: str) -> dict[str, float]:
    return parse_metrics_text(httpx.get(base_url + "/metrics", timeout=10).text)


def delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    keys = [k for k in after if k == name or k.startswith(name + "{")]
    return int(sum(after[k] - before.get(k, 0.0) for k in keys))


def test_client_counts_equal_server_counts(server: RunningServer, tmp_path: Path):
    before = scrape(server.base_url)
    # no initial test request: the server counts only the run's requests
    done = bench("--base-url", server.base_url, "--ready-check-timeout-sec", "0",
                 "--dataset-name", "prefix_repetition",
                 "--prefix-repetition-prefix-len", "64", "--prefix-repetition-suffix-len", "16",
                 "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-output-len", "6",
                 "--num-prompts", "12", "--max-concurrency", "3", "--ignore-eos",
                 "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    after = scrape(server.base_url)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] == 12 and data["failed"] == 0
    assert data["completed"] == delta(before, after, "kvtier:request_success_total")
    assert data["total_input_tokens"] == delta(before, after, "kvtier:prompt_tokens_total")
    assert data["total_output_tokens"] == 12 * 6
    assert data["total_output_tokens"] == delta(before, after, "kvtier:generation_tokens_total")
    counters = data["kvtier_server"]
    assert counters["prompt_tokens"] == data["total_input_tokens"]
    assert counters["tier_hit_tokens"]["device"] == counters["matched_tokens"] > 0
    assert "Prompt tokens matched (all caches):" in done.stdout
    assert "hit tokens, device:" in done.stdout


def test_unknown_dataset_and_unreachable_server_are_clear_errors(server: RunningServer):
    done = bench("--base-url", server.base_url, "--dataset-name", "sharegtp")
    assert done.returncode == 2 and "invalid choice: 'sharegtp'" in done.stderr
    done = bench("--base-url", "http://127.0.0.1:9", "--dataset-name", "random")
    assert done.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    done = bench("--base-url", server.base_url, "--served-model-name", "nope",
                 "--num-prompts", "2", "--random-input-len", "8")
    assert done.returncode == 1 and "Serving Benchmark Result" not in done.stdout
    assert ("the initial test request to /v1/completions failed: HTTP 404 Not Found: "
            in done.stderr and "nope" in done.stderr), done.stderr


def test_rejected_requests_are_failed_requests(server: RunningServer):
    # Prompts of 75..225 tokens against a 192-token context: some are rejected with HTTP 400.
    before = scrape(server.base_url)
    done = bench("--base-url", server.base_url, "--ready-check-timeout-sec", "0",
                 "--dataset-name", "random", "--random-input-len", "150",
                 "--random-range-ratio", "0.5",
                 "--random-output-len", "4", "--num-prompts", "12", "--max-concurrency", "4")
    after = scrape(server.base_url)
    assert done.returncode == 0, done.stderr
    completed = int(done.stdout.split("Successful requests:")[1].split()[0])
    failed = int(done.stdout.split("Failed requests:")[1].split()[0])
    assert completed + failed == 12 and failed > 0 and completed > 0
    assert "HTTP 400" in done.stdout
    assert completed == delta(before, after, "kvtier:request_success_total")


def test_a_server_dying_mid_run_leaves_failed_requests_and_a_result(tmp_path: Path):
    with running_server(tiny_server("dies"), tmp_path / "logs") as dying:
        assert dying.process is not None
        run = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", "bench", "--disable-tqdm", "--base-url",
             dying.base_url, "--ready-check-timeout-sec", "0", "--dataset-name", "random",
             "--random-input-len", "32", "--random-output-len", "32", "--ignore-eos",
             "--num-prompts", "40",
             "--max-concurrency", "1", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "r.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if delta({}, scrape(dying.base_url), "kvtier:request_success_total") >= 3:
                break
            time.sleep(0.2)
        os.killpg(dying.process.pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=120)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] >= 3 and data["failed"] >= 1
    assert data["completed"] + data["failed"] == 40
    assert "Serving Benchmark Result" in stdout and "Traceback" not in stderr
