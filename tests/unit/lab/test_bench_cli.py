"""bench_cli.py / bench_run.py: every BenchConfig field is a flag; errors name the value;
a run against a fake kvtier-like server prints vLLM's summary, the tier counters and saves
vLLM's JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvtier.bench.config import BenchConfig
from kvtier.cli import build_parser
from kvtier.lab.bench_cli import config_from_args, result_filename
from kvtier.lab.experiment import ServerSpec
from kvtier.lab.server import running_server
from kvtier.utils.resources import find_package_file
from kvtier.utils.tokenizer_json import QWEN_TOKENIZER
from tests.unit.lab.test_runner import FAKE, TOKENIZER


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_every_benchconfig_field_is_a_flag_with_its_default():
    args = parse()
    for field in dataclasses.fields(BenchConfig):
        assert hasattr(args, field.name), field.name
    assert config_from_args(args) == BenchConfig()


def test_flags_map_to_the_config():
    args = parse("--base-url", "http://h:1", "--dataset", "prefix_repetition",
                 "--prefix-repetition-prefix-len", "64", "--request-rate", "inf",
                 "--max-concurrency", "3", "--goodput", "ttft:500", "tpot:50",
                 "--header", "x-a=1", "--extra-body", '{"top_k": 5}', "--ignore-eos",
                 "--no-scrape-metrics", "--backend", "openai-chat")
    config = config_from_args(args)
    assert config.dataset_name == "prefix_repetition" and config.prefix_repetition_prefix_len == 64
    assert config.max_concurrency == 3 and config.goodput == ("ttft:500", "tpot:50")
    assert config.header == {"x-a": "1"} and config.extra_body == {"top_k": 5}
    assert config.ignore_eos and not config.scrape_metrics and config.is_chat


@pytest.mark.parametrize(("argv", "message"), [
    (["--base-url", "localhost:8000"],
     "--base-url 'localhost:8000' is not an http:// or https:// URL"),
    (["--port", "70000"], "--host '127.0.0.1' and --port 70000 name no server"),
    (["--port", "0"], "--host '127.0.0.1' and --port 0 name no server"),
    (["--host", ""], "--host '' and --port 8000 name no server"),
    (["--dataset-path", "sg.json"],
     "--dataset-path is read by the sharegpt dataset only, not random"),
    (["--dataset-name", "sharegpt", "--dataset-path", ""], "--dataset-path is empty"),
    (["--tokenizer", ""], "--tokenizer is empty"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32 - 1\], got -1"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32 - 1\], got 4294967296"),
    (["--burstiness", "-1"], "--burstiness must be > 0"),
    (["--request-timeout-s", "0"], "--request-timeout-s must be > 0, got 0.0"),
    (["--prefix-repetition-num-prefixes", "0"],
     "--prefix-repetition-num-prefixes must be >= 1, got 0"),
    (["--long-doc-qa-num-documents", "0"], "--long-doc-qa-num-documents must be >= 1, got 0"),
    (["--long-doc-qa-repeat-count", "0"], "--long-doc-qa-repeat-count must be >= 1, got 0"),
    (["--prefix-repetition-prefix-len", "-5"],
     "--prefix-repetition-prefix-len must be >= 0, got -5"),
    (["--random-output-len", "0"], "--random-output-len must be >= 1, got 0"),
    (["--prefix-repetition-output-len", "-1"], "--prefix-repetition-output-len must be >= 1"),
    (["--multi-turn-input-len", "-4"], "--multi-turn-input-len must be >= 1, got -4"),
    (["--multi-turn-output-len", "0"], "--multi-turn-output-len must be >= 1, got 0"),
    (["--long-doc-qa-output-len", "0"], "--long-doc-qa-output-len must be >= 1, got 0"),
    (["--output-len", "-1"], "--output-len must be >= 1, got -1"),
    (["--sharegpt-output-len", "0"], "--sharegpt-output-len must be >= 1, got 0"),
    (["--input-len", "0"], "--input-len must be >= 1, got 0"),
    (["--random-input-len", "-5"], "--random-input-len must be >= 0, got -5"),
    (["--random-input-len", "0"], "--random-input-len must be >= 1 when --random-prefix-len is 0"),
    (["--prefix-repetition-prefix-len", "0", "--prefix-repetition-suffix-len", "0"],
     "--prefix-repetition-prefix-len and --prefix-repetition-suffix-len are both 0"),
    (["--dataset-name", "prefix_repetition", "--num-prompts", "4"],
     r"--num-prompts \(4\) must be >= --prefix-repetition-num-prefixes \(10\)"),
    (["--random-range-ratio", "2"], r"--random-range-ratio must be in \[0, 1\), got 2.0"),
    # the shortest prompt, floor(1 × 0.5) = 0 tokens, was found only once the workload was
    # built: exit 1 and a message that named no flag
    (["--random-input-len", "1", "--random-range-ratio", "0.5"],
     r"--random-input-len 1 with --random-range-ratio 0.5 and --random-prefix-len 0 allows "
     r"prompts of 0 tokens"),
    (["--header", "novalue"], "--header: 'novalue' is not KEY=VALUE"),
    (["--extra-body", "[1]"], "--extra-body: expected a JSON object"),
    (["--goodput", "ttft"], "goodput SLO 'ttft' is not KEY:VALUE"),
    (["--goodput", "ttft:abc"], "--goodput SLO 'ttft:abc': 'abc' is not a number"),
    (["--goodput", "ttft:nan"], "--goodput SLO ttft:nan must be non-negative"),
    (["--metric-percentiles", "50,150"],
     "--metric-percentiles '50,150': '150' is not a percentile"),
    (["--metric-percentiles", "p99"], "--metric-percentiles 'p99': 'p99' is not a percentile"),
    (["--long-doc-qa-hit-miss-ratio", "x"], "--long-doc-qa-hit-miss-ratio 'x' is not h:m"),
])
def test_bad_values_are_named(argv: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        config_from_args(parse(*argv))


def test_unknown_dataset_is_an_argparse_error(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        parse("--dataset-name", "nope")
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_result_filename_is_vllms():
    name = result_filename(BenchConfig(max_concurrency=4), "org/Some-Model")
    assert name.startswith("openai-infqps-concurrency4-Some-Model-") and name.endswith(".json")
    assert result_filename(BenchConfig(request_rate=2.5, label="x"), "m").startswith("x-2.5qps-m-")


def bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "--disable-tqdm", *argv],
                          capture_output=True, text=True, timeout=120)


def test_unreachable_server_is_one_clear_line():
    done = bench("--base-url", "http://127.0.0.1:9", "--dataset-name", "random")
    assert done.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_result_dir_that_cannot_be_made_is_refused_before_the_run(tmp_path: Path):
    (tmp_path / "taken").write_text("")
    done = bench("--base-url", "http://127.0.0.1:9", "--save-result", "--result-dir",
                 str(tmp_path / "taken"))
    assert done.returncode == 2, done.stderr
    assert f"--result-dir: cannot create {str(tmp_path / 'taken')!r}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_result_filename_that_is_a_directory_is_refused_before_the_run(tmp_path: Path):
    (tmp_path / "r.json").mkdir()
    done = bench("--base-url", "http://127.0.0.1:9", "--save-result", "--result-dir",
                 str(tmp_path), "--result-filename", "r.json")
    assert done.returncode == 2, done.stderr
    assert f"--result-filename: {str(tmp_path / 'r.json')!r} is a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_server_that_speaks_no_openai_fails_the_initial_test_request(tmp_path: Path):
    """vLLM's initial test run: one short request must succeed before the load is sent, so a
    plain HTTP server (given --model, /v1/models is not asked) is one clear line in seconds,
    not ten requests failed one a second. --ready-check-timeout-sec 0 skips it (vLLM's)."""
    spec = ServerSpec("plain", launch=f"{sys.executable} -m http.server {{port}} --bind "
                                      "127.0.0.1", health_path="/", startup_timeout_s=30)
    argv = ("--model", "m", "--tokenizer", TOKENIZER, "--random-input-len", "16",
            "--random-output-len", "2", "--num-prompts", "10", "--request-rate", "1")
    with running_server(spec, tmp_path / "logs") as server:
        done = bench("--base-url", server.base_url, *argv)
        skipped = bench("--base-url", server.base_url, *argv, "--num-prompts", "1",
                        "--ready-check-timeout-sec", "0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Serving Benchmark Result" not in done.stdout
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"kvtier bench: error: {server.base_url}: the initial test request "
                            "to /v1/completions failed: HTTP 501 Unsupported method ('POST'): ")
    assert error.endswith("(check --model, --endpoint and --backend)")
    assert skipped.returncode == 1 and "all 1 requests failed" in skipped.stderr


A_TURN = {"from": "human", "value": "one two three four five six"}


@pytest.mark.parametrize(("make", "problem"), [
    pytest.param(lambda p: None, "no such file", id="missing"),
    pytest.param(lambda p: p.mkdir(), "is a directory, not a ShareGPT JSON file", id="directory"),
    # Any other OSError (as root, a chmod 0 file stays readable): a path through a file.
    pytest.param(lambda p: (p.write_text("[]"), p / "inner")[1], "cannot be read: Not a directory",
                 id="unreadable"),
    pytest.param(lambda p: p.write_text(""), "empty, not a JSON array", id="empty-file"),
    pytest.param(lambda p: p.write_text("hello"), "not a JSON array", id="not-json"),
    pytest.param(lambda p: p.write_text('{"conversations": []}'), "not a JSON array",
                 id="json-object"),
    pytest.param(lambda p: p.write_text("[1, 2]"), "record 0 is not a ShareGPT conversation",
                 id="not-sharegpt"),
    pytest.param(lambda p: p.write_text(json.dumps([{"conversations": [A_TURN]}])),
                 "holds no conversation of two or more turns", id="one-turn-only"),
])
def test_a_bad_dataset_path_is_a_usage_error_before_any_request(tmp_path: Path, make, problem):
    """Missing, a directory, unreadable, not JSON, not ShareGPT-shaped: one line naming the
    flag and the file, exit 2 as for any bad option, and the server is never asked (the one
    here does not exist: asking it would be "cannot reach the server")."""
    path = tmp_path / "sg.json"
    given = make(path)
    path = given if isinstance(given, Path) else path
    done = bench("--base-url", "http://127.0.0.1:9", "--dataset-name", "sharegpt",
                 "--dataset-path", str(path), "--tokenizer", TOKENIZER)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"kvtier bench: error: --dataset-path {str(path)!r}: {problem}")


def test_a_dataset_path_with_nothing_past_the_length_filters_is_a_usage_error(tmp_path: Path):
    """With --tokenizer given the whole workload is built before the server is asked."""
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"value": "hi"}, {"value": "yo"}]}]))
    done = bench("--base-url", "http://127.0.0.1:9", "--dataset-name", "sharegpt",
                 "--dataset-path", str(path), "--tokenizer", TOKENIZER)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"kvtier bench: error: --dataset-path {str(path)!r}: no conversation passes vLLM's "
        "length filters (prompt and output 4 to 1024 tokens, 2048 together)"]


def _qwen_dir_with_a_broken_config(path: Path) -> None:
    path.mkdir()
    shutil.copy(find_package_file(*QWEN_TOKENIZER), path)
    (path / "tokenizer_config.json").write_text("{")


@pytest.mark.parametrize(("value", "make", "problem"), [
    pytest.param("tok.json", lambda p: None, lambda p: f"{str(p)!r}: no such file or directory",
                 id="missing-file"),
    pytest.param("qwen/tokenizer.json", lambda p: None,  # was silently Qwen2.5's tokenizer
                 lambda p: f"{str(p)!r}: no such file or directory", id="missing-named-qwen"),
    pytest.param("qwen", lambda p: p.mkdir(),
                 lambda p: f"{str(p)!r} is a directory without a tokenizer.json",
                 id="directory-without-one"),
    pytest.param("tokenizer.json", lambda p: p.write_text('{"not": "a tokenizer"'),
                 lambda p: f"{str(p)!r} is not a readable tokenizer.json: ", id="malformed-json"),
    pytest.param("tokenizer.json", lambda p: p.write_text('{"not": "a tokenizer"}'),
                 lambda p: f"{str(p)!r} is not a readable tokenizer.json: ",
                 id="json-but-no-tokenizer"),
    pytest.param("tok", _qwen_dir_with_a_broken_config,
                 lambda p: f"{str(p / 'tokenizer_config.json')!r} is not a readable "
                           "tokenizer_config.json: ", id="malformed-tokenizer-config"),
])
def test_a_bad_tokenizer_is_a_usage_error_before_any_request(tmp_path: Path, value, make,
                                                              problem):
    """One line naming the flag and the value, exit 2, and the (absent) server never asked."""
    path = tmp_path / value
    path.parent.mkdir(exist_ok=True)
    make(path)
    done = bench("--base-url", "http://127.0.0.1:9", "--tokenizer", str(path))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"kvtier bench: error: --tokenizer {problem(path)}")


def test_a_tokenizer_name_that_resolves_to_nothing_is_a_usage_error():
    done = bench("--base-url", "http://127.0.0.1:9", "--tokenizer", "no-org/no-such-model")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "kvtier bench: error: --tokenizer 'no-org/no-such-model' names no tokenizer.json: not a "
        "file, a directory holding one, a model in the local Hugging Face cache, nor a Qwen name"]


class _ListsModelsNeverAnswers(socketserver.BaseRequestHandler):
    """GET /v1/models gets a model list; any other request is read and never answered."""

    def handle(self) -> None:
        if self.request.recv(65536).startswith(b"GET /v1/models"):
            body = b'{"object": "list", "data": [{"id": "m"}]}'
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
            return
        while self.request.recv(65536):  # hold the connection until the client hangs up
            pass


class _ThreadedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a held connection must not block the shutdown


def test_a_server_that_never_answers_fails_the_ready_check_at_its_timeout():
    """A real socket server that accepts the request and never replies: the ready check gives
    up after --ready-check-timeout-sec with one line naming the URL and the timeout, instead
    of waiting out --request-timeout-s (6 hours by default)."""
    with _ThreadedServer(("127.0.0.1", 0), _ListsModelsNeverAnswers) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "kvtier.cli", "bench", "--disable-tqdm", "--base-url",
                 url, "--tokenizer", TOKENIZER, "--random-input-len", "8", "--num-prompts", "2",
                 "--ready-check-timeout-sec", "1"], capture_output=True, text=True, timeout=6)
        finally:
            server.shutdown()
    assert time.perf_counter() - start < 4
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"kvtier bench: error: {url}: the test request to /v1/completions got no answer within "
        "1 s (--ready-check-timeout-sec 1)")


def test_run_against_a_fake_kvtier_server(tmp_path: Path):
    spec = ServerSpec("fake", launch=f"{sys.executable} {FAKE} --port {{port}} --kvtier "
                                     "--fail-every 4", startup_timeout_s=30)
    with running_server(spec, tmp_path / "logs") as server:
        done = bench("--base-url", server.base_url, "--dataset-name", "random",
                     "--random-input-len", "16", "--random-output-len", "3",
                     "--num-prompts", "8", "--tokenizer", TOKENIZER, "--save-result",
                     "--result-dir", str(tmp_path), "--result-filename", "r.json",
                     "--metadata", "run=unit")
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout
    assert "Failed requests:                         2" in done.stdout
    assert "failed ×2: HTTP 500" in done.stdout
    assert "hit tokens, cpu:" in done.stdout and "hit tokens, device:" in done.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] == 6 and data["failed"] == 2 and data["run"] == "unit"
    assert data["request_rate"] == "inf" and "mean_ttft_ms" in data and "p99_itl_ms" in data
    assert data["kvtier_server"]["num_requests"] == 6 and "ttfts" not in data
