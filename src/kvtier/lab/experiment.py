"""Experiments: server configurations × workloads, parsed from TOML and validated up front.

An experiment file (or a built-in preset under `presets/`) looks like this:

    name = "seed-cpu"
    description = "..."
    model = "random:tiny-llama"        # optional: `--model` of every kvtier server
    tokenizer = "path/tokenizer.json"   # optional: else resolved from the model name
    restart_per_workload = false        # true: per workload, a fresh server of each config
    repeats = 1                         # >1: run everything that many times, interleaved;
                                        # the report shows medians (noisy machines) and each
                                        # config against the first, repeat by repeat; `{repeat}`
                                        # in engine values / launch is the run's index

    [bench]                             # BenchConfig fields shared by every workload
    seed = 0
    ignore_eos = true

    [[servers]]                         # exactly one of engine / base_url / launch
    name = "prefix cache only"
    engine = { num_gpu_blocks_override = 64 }   # `kvtier serve` flags, started by the lab

    [[servers]]
    name = "vllm"
    launch = "vllm serve {model} --port {port}"  # any server, started by the lab
    model = "Qwen/Qwen2.5-1.5B-Instruct"
    reset_path = "/reset_prefix_cache"  # optional: POSTed before each run (a cold cache);
                                        # vLLM needs VLLM_SERVER_DEV_MODE=1 for it, SGLang's
                                        # is /flush_cache

    [[workloads]]                       # BenchConfig fields (vLLM's option names)
    name = "P"
    dataset_name = "prefix_repetition"
    num_prompts = 64

Every problem is found before anything starts and raised as `ExperimentError` naming the
field (`servers[1].engine.kv_tier`, `workloads[0].num_prompts`) and the bad value.
"""

from __future__ import annotations

import dataclasses
import math
import string
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvtier.bench.config import BenchConfig

PRESETS_PACKAGE = "kvtier.lab.presets"
_EXPERIMENT_KEYS = {"name", "description", "model", "tokenizer", "bench", "servers",
                    "workloads", "restart_per_workload", "repeats"}
_SERVER_KEYS = {"name", "engine", "args", "base_url", "launch", "model", "env", "health_path",
                "startup_timeout_s", "device_kv_tokens", "block_size", "reset_path"}
_PLACEHOLDERS = ("{host}", "{port}", "{model}")
# Fields the lab sets itself: where to send, and what to do with results.
_LAB_OWNED = {"base_url", "host", "port"}

Scalar = str | int | float | bool


class ExperimentError(ValueError):
    """A malformed experiment: the message names the field and the value."""


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration: started by the lab (kvtier or a launch command) or given."""

    name: str
    engine: tuple[str, ...] = ()
    """`kvtier serve` flags (without --host/--port), from the `engine` table then `args`."""
    base_url: str | None = None
    launch: str | None = None
    """Shell command template with {host}, {port} and {model}."""
    model: str | None = None
    """`--model` for kvtier servers, `{model}` for launch commands; None = the default."""
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    startup_timeout_s: float = 600.0
    device_kv_tokens: int | None = None
    """Device KV pool in tokens, for the regime map; None = read from kvtier's /metrics."""
    block_size: int = 16
    reset_path: str | None = None
    """POSTed before each run, so that no run starts from what an earlier one cached (a
    server the lab does not restart: `base_url`, repeats, several workloads); a run whose
    reset is not answered 2xx fails. None: no reset."""

    @property
    def kind(self) -> str:
        """"kvtier" (the lab runs `kvtier serve`), "launch" or "url"."""
        if self.base_url is not None:
            return "url"
        return "launch" if self.launch is not None else "kvtier"

    def engine_value(self, flag: str) -> str | None:
        """The last value given for `--flag` in the engine flags (None when absent)."""
        value = None
        for i, item in enumerate(self.engine[:-1]):
            if item == f"--{flag}":
                value = self.engine[i + 1]
        return value


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: BenchConfig field overrides (validated against BenchConfig)."""

    name: str
    fields: Mapping[str, Any]

    def bench_config(self, base_url: str, **extra: Any) -> BenchConfig:
        """The run's BenchConfig against `base_url`; `extra` (model, tokenizer…) wins."""
        return BenchConfig(**{**self.fields, "base_url": base_url, **extra})

    def prefix_working_set_tokens(self) -> int | None:
        """Unique shared-prefix tokens the workload cycles through (None: no such structure)."""
        cfg = BenchConfig(**self.fields)
        if cfg.dataset_name == "prefix_repetition":
            return cfg.prefix_repetition_num_prefixes * cfg.prefix_repetition_prefix_len
        if cfg.dataset_name == "long_doc_qa":
            return cfg.long_doc_qa_num_documents * cfg.long_doc_qa_document_length
        if cfg.dataset_name == "random" and cfg.random_prefix_len:
            return cfg.random_prefix_len
        if cfg.dataset_name == "multi_turn":
            return cfg.multi_turn_system_prompt_len
        return None


@dataclass(frozen=True)
class Experiment:
    """Servers × workloads, plus where it came from (a file path or a preset name)."""

    name: str
    servers: tuple[ServerSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    description: str = ""
    model: str | None = None
    tokenizer: str | None = None
    restart_per_workload: bool = False
    """Per workload, start a fresh server of each configuration in turn (workload-major):
    no workload inherits a warm cache, and the runs compared are adjacent in time."""
    repeats: int = 1
    """Run every configuration × workload this many times, round-robin over configurations,
    so slow drift of a shared machine hits each configuration alike; reports use medians."""
    source: str = ""

    def replace(self, **changes: Any) -> Experiment:
        return dataclasses.replace(self, **changes)


# -- loading -----------------------------------------------------------------------------------

def list_presets() -> dict[str, str]:
    """{preset name: its description}, from the TOML files shipped in `presets/`."""
    found: dict[str, str] = {}
    for entry in sorted(resources.files(PRESETS_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            found[entry.name[:-5]] = str(data.get("description", "")).strip()
    return found


def load_experiment(target: str) -> Experiment:
    """A preset name (see `list_presets`) or the path of an experiment TOML file."""
    path = Path(target)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ExperimentError(f"experiment file {target!r} does not exist")
        return parse_experiment(_read_toml(path.read_text(encoding="utf-8"), target), target)
    presets = list_presets()
    if target not in presets:
        raise ExperimentError(f"{target!r} is neither an experiment file nor a preset "
                              f"(presets: {', '.join(presets)})")
    text = resources.files(PRESETS_PACKAGE).joinpath(f"{target}.toml").read_text("utf-8")
    return parse_experiment(_read_toml(text, target), f"preset {target}")


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{source}: not valid TOML: {exc}") from exc


def _repeats(data: Mapping[str, Any]) -> int:
    repeats = _typed(data, "repeats", int, "experiment", default=1)
    if not 1 <= repeats <= 100:
        raise ExperimentError(f"experiment.repeats: expected 1 to 100, got {repeats!r}")
    return repeats


def parse_experiment(data: Mapping[str, Any], source: str = "") -> Experiment:
    """Validate a parsed TOML document into an Experiment; raises ExperimentError."""
    _no_unknown(data, _EXPERIMENT_KEYS, "experiment")
    name = _typed(data, "name", str, "experiment", default=Path(source).stem or "experiment")
    model = _typed(data, "model", str, "experiment", default=None) or None
    shared = data.get("bench", {})
    if not isinstance(shared, Mapping):
        raise ExperimentError(f"bench: expected a table of BenchConfig fields, got {shared!r}")
    servers = _list_of_tables(data, "servers")
    workloads = _list_of_tables(data, "workloads")
    experiment = Experiment(
        name=name, description=_typed(data, "description", str, "experiment", default=""),
        model=model, tokenizer=_typed(data, "tokenizer", str, "experiment", default=None),
        restart_per_workload=_typed(data, "restart_per_workload", bool, "experiment",
                                    default=False),
        repeats=_repeats(data),
        servers=tuple(_parse_server(s, f"servers[{i}]", model) for i, s in enumerate(servers)),
        workloads=tuple(_parse_workload(w, f"workloads[{i}]", shared)
                        for i, w in enumerate(workloads)),
        source=source)
    _unique([s.name for s in experiment.servers], "servers")
    _unique([w.name for w in experiment.workloads], "workloads")
    return experiment


def _list_of_tables(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = data.get(key)
    if not items:
        raise ExperimentError(f"{key}: at least one [[{key}]] table is required")
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ExperimentError(f"{key}: expected [[{key}]] tables, got {items!r}")
    return items


def _unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ExperimentError(f"{where}[{i}].name: {name!r} is used twice")
        seen.add(name)


def _no_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ExperimentError(f"{where}.{unknown[0]}: unknown field (allowed: "
                              f"{', '.join(sorted(allowed))})")


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = ...) -> Any:
    """table[key] checked against `kind` (bool is not accepted as a number)."""
    if key not in table:
        if default is ...:
            raise ExperimentError(f"{where}.{key}: required field is missing")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ExperimentError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _parse_server(table: Mapping[str, Any], where: str, model: str | None) -> ServerSpec:
    _no_unknown(table, _SERVER_KEYS, where)
    name = _typed(table, "name", str, where)
    sources = [k for k in ("base_url", "launch") if k in table]
    if len(sources) > 1 or (sources and ("engine" in table or "args" in table)):
        given = sorted(set(table) & {"engine", "args", *sources})
        raise ExperimentError(f"{where}: give one of engine/args, base_url or launch "
                              f"(got {', '.join(given)})")
    launch = _typed(table, "launch", str, where, default=None)
    if launch is not None and "{port}" not in launch:
        raise ExperimentError(f"{where}.launch: the command must contain {{port}} (placeholders: "
                              f"{', '.join(_PLACEHOLDERS)}), got {launch!r}")
    if launch is not None:
        _check_placeholders(launch, f"{where}.launch")
    base_url = _typed(table, "base_url", str, where, default=None)
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ExperimentError(f"{where}.base_url: expected http(s)://host:port, got {base_url!r}")
    flags = engine_flags(table.get("engine", {}), f"{where}.engine")
    args = _typed(table, "args", list, where, default=[])
    if not all(isinstance(a, str) for a in args):
        raise ExperimentError(f"{where}.args: expected a list of strings, got {args!r}")
    env = _typed(table, "env", dict, where, default={})
    for key, value in env.items():
        if isinstance(value, dict | list):
            raise ExperimentError(f"{where}.env.{key}: expected a string or number, got "
                                  f"{value!r}")
    reset_path = _typed(table, "reset_path", str, where, default=None)
    if reset_path is not None and not reset_path.startswith("/"):
        raise ExperimentError(f"{where}.reset_path: expected a path such as "
                              f"'/reset_prefix_cache', got {reset_path!r}")
    startup_timeout_s = _typed(table, "startup_timeout_s", (int, float), where, default=600.0)
    device_kv_tokens = _typed(table, "device_kv_tokens", int, where, default=None)
    block_size = _typed(table, "block_size", int, where, default=16)
    for key, value in (("startup_timeout_s", startup_timeout_s),
                       ("device_kv_tokens", device_kv_tokens), ("block_size", block_size)):
        if value is not None and not value > 0:
            raise ExperimentError(f"{where}.{key}: expected a positive number, got {value!r}")
    return ServerSpec(
        name=name, engine=(*flags, *args), base_url=base_url, launch=launch,
        model=_typed(table, "model", str, where, default=model) or None,
        env={str(k): str(v) for k, v in env.items()},
        health_path=_typed(table, "health_path", str, where, default="/health"),
        startup_timeout_s=float(startup_timeout_s), device_kv_tokens=device_kv_tokens,
        block_size=block_size, reset_path=reset_path)


def _check_placeholders(template: str, where: str) -> None:
    """The lab fills a launch command with str.format: any other brace (a JSON option,
    ${VAR}) would raise there, as a traceback once servers before it had run."""
    hint = "write {{ and }} for a literal brace"
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise ExperimentError(f"{where}: {exc}; {hint}") from None
    for name, spec in fields:
        if f"{{{name}}}" not in (*_PLACEHOLDERS, "{repeat}") or spec:
            text = f"{{{name}{':' + spec if spec else ''}}}"
            raise ExperimentError(f"{where}: unknown placeholder {text!r} (placeholders: "
                                  f"{', '.join(_PLACEHOLDERS)}, {{repeat}}); {hint}")


def engine_flags(engine: Any, where: str) -> list[str]:
    """{num_gpu_blocks_override = 64, kv_tier = ["cpu:1GiB"], enable_prefix_caching = false}
    -> ["--num-gpu-blocks-override", "64", "--kv-tier", "cpu:1GiB",
    "--no-enable-prefix-caching"]. Lists repeat the flag; false becomes --no-FLAG."""
    if not isinstance(engine, Mapping):
        raise ExperimentError(f"{where}: expected a table of kvtier serve flags, got {engine!r}")
    flags: list[str] = []
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if key in ("host", "port"):
            raise ExperimentError(f"{where}.{key}: the lab picks the host and port itself")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
            continue
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise ExperimentError(f"{where}.{key}: expected a string, number or list of "
                                      f"them, got {value!r}")
            flags += [flag, str(item)]
    return flags


def _parse_workload(table: Mapping[str, Any], where: str,
                    shared: Mapping[str, Any]) -> WorkloadSpec:
    name = _typed(table, "name", str, where)
    fields = {**shared, **{k: v for k, v in table.items() if k != "name"}}
    return WorkloadSpec(name=name, fields=validate_bench_fields(fields, where))


def validate_bench_fields(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check names and types against BenchConfig, then build one to run its own checks."""
    hints = typing.get_type_hints(BenchConfig)
    known = {f.name for f in dataclasses.fields(BenchConfig)} - _LAB_OWNED
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in known:
            raise ExperimentError(f"{where}.{key}: unknown benchmark option (see kvtier bench "
                                  "--help; base_url/host/port are set by the lab)")
        out[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        BenchConfig(**out)
    except (ValueError, TypeError) as exc:
        raise ExperimentError(f"{where}: {exc}") from exc
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """TOML value -> the BenchConfig field's type; "inf" is accepted for floats."""
    allowed = set(typing.get_args(hint)) if _is_union(hint) else {hint}
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple[str, ...] in allowed and isinstance(value, list | str):
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ExperimentError(f"{where}: expected a string or a list of strings, got "
                                  f"{value!r}")
        return tuple(value.split() if isinstance(value, str) else value)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is Mapping and isinstance(value, Mapping):
            if typing.get_args(kind)[1:] == (str,) and not all(
                    isinstance(v, str) for v in value.values()):
                raise ExperimentError(f"{where}: expected a table of strings, got {value!r}")
            return dict(value)
        if isinstance(origin, type) and isinstance(value, origin) and not (
                isinstance(value, bool) and origin is not bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise ExperimentError(f"{where}: expected {names}, got {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
