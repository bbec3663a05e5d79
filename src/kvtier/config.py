"""Engine configuration: one frozen, validated dataclass per subsystem, and the aggregate.

Owns the names of every engine argument. The same names are used as keyword arguments of
`kvtier.LLM(...)` and, with dashes, as CLI flags (`enable_prefix_caching` <->
`--enable-prefix-caching`). No I/O happens here; values computed at run time (the number of KV
blocks, the model's shape) live in the objects that compute them, never back in a config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULING_POLICIES = ("fcfs", "lpm")
STORE_POLICIES = ("lazy", "write-through")
LOAD_TIMINGS = ("same-step", "next-step")
AUTO_MIN_REUSE_RATE = 0.05
"""`kv_store_min_hits auto` stores chunks seen once while at least this share of recent prompt
blocks had been seen before. ShareGPT without shared prompts stays near 0.1%; a shared-prefix
workload is far above (P: ~90%)."""


class ConfigError(ValueError):
    """An engine argument has a bad value; the message names the argument and the value."""


_TYPE_CHECKS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((numbers.Integral,), "an integer"),  # numpy's integers too
    "float": ((numbers.Real,), "a number"),
    "bool": ((bool,), "True or False"),
    "str": ((str,), "a string"),
}


def _check_field_types(config: object) -> None:
    """Refuse a value of the wrong type (`LLM(max_num_seqs="8")`, `enforce_eager="no"`) by
    its argument's name, before a comparison fails without one or a truthy string turns a
    switch on. Fields typed `int`, `float`, `bool` or `str` (or one of them `| None`) are
    checked; a bool is no integer here."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        kind, _, optional = str(f.type).partition(" | ")
        if kind not in _TYPE_CHECKS or optional not in ("", "None"):
            continue
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        types, expected = _TYPE_CHECKS[kind]
        if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
            raise ConfigError(f"{f.name} {value!r} must be {expected}"
                              + (" or None" if optional else ""))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str | int) -> int:
    """Parse '8GiB', '512MB', '1.5G' or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"cannot parse size {text!r} (expected e.g. 8GiB, 512MB or 1000000)")
    number, unit = match.groups()
    unit = (unit or "").lower().rstrip("b")
    value = float(number) * _UNITS[unit]
    if not math.isfinite(value):  # int(inf) would raise OverflowError, not a ConfigError
        raise ConfigError(f"size {text!r} is too large")
    return int(value)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str | None = None
    """HF directory, a .gguf file, `random:<architecture>`, or None for the embedded default."""
    dtype: str = "auto"
    """float32 / bfloat16 / float16, or auto (bfloat16 on CUDA, float32 on the CPU)."""
    seed: int = 0
    """Seed for random weights and for requests that set no seed of their own."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    max_logprobs: int = 20
    """Most `logprobs` (top tokens per output position) a request may ask for, as vLLM's;
    -1 = the vocabulary size."""
    generation_config: str = "auto"
    """Where requests' default sampling comes from, as vLLM's: `auto`, the model directory's
    generation_config.json; `vllm`, the API's own defaults; or a folder holding such a file
    (`kvtier.model.generation_config`)."""
    override_generation_config: dict[str, Any] | None = None
    """Sampling defaults set over the generation config's (vLLM's names: temperature, top_p,
    top_k, min_p, repetition_penalty, max_new_tokens)."""

    def __post_init__(self) -> None:
        _check_field_types(self)
        overrides = self.override_generation_config
        if overrides is not None and not (isinstance(overrides, dict)
                                          and all(isinstance(k, str) for k in overrides)):
            raise ConfigError(f"override_generation_config {overrides!r} must be a dict of "
                              "field names to values, e.g. {'temperature': 0.5}")
        if not self.generation_config:
            raise ConfigError("generation_config is empty (give auto, vllm or a folder)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not -2**63 <= self.seed < 2**64:  # what a torch generator takes
            raise ConfigError(f"seed {self.seed} must be in -2**63..2**64-1")
        if self.max_logprobs < -1:
            raise ConfigError(f"max_logprobs {self.max_logprobs} must be >= -1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class CacheConfig:
    """The device KV block pool and its prefix cache."""

    block_size: int = 16
    """Tokens per KV block."""
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    """Bytes for the device KV pool; None = from gpu_memory_utilization (CUDA) or 2 GiB (CPU)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use (weights + activations + KV), like vLLM."""
    num_gpu_blocks_override: int | None = None
    """Exact number of device KV blocks, to create pressure on purpose (also on the CPU)."""

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ConfigError(f"block_size {self.block_size} must be a power of two in 1..128")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization {self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError(
                f"num_gpu_blocks_override {self.num_gpu_blocks_override} must be >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError(
                f"kv_cache_memory_bytes {self.kv_cache_memory_bytes} must be positive")


DEFAULT_MAX_NUM_SEQS = 256
"""max_num_seqs when not given (and max_num_batched_tokens is at least this)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    max_num_seqs: int | None = None
    """Most requests running at once; None (not given) = DEFAULT_MAX_NUM_SEQS, lowered to
    max_num_batched_tokens when that is smaller, as vLLM's EngineArgs default it. Always an
    int once the config is built; one given larger than max_num_batched_tokens is refused."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's context length."""
    scheduling_policy: str = "fcfs"
    """Order of admission: fcfs, or lpm (longest prefix match first, like SGLang's: waiting
    requests that share the most KV with the device cache go first, so shared prefix blocks
    serve many requests at once; a request waiting too long goes first regardless)."""
    long_prefill_token_threshold: int = 0
    """Most prompt tokens one request may prefill in a step (vLLM's knob of that name); 0 = up
    to the step budget. A cap keeps one long prefill from holding up short ones (a prefix
    loaded from a tier, then a short extend) for a whole long step."""
    short_prefill_first_tokens: int = 0
    """A waiting request with more than this many prompt tokens left to compute (beyond the
    device cache's and the tiers' hits) is held for one prefill step when the step prefills
    one with at most this many: cache hits then get their first token after their own short
    extend, not after a long prefill that shares their step. 0 = off."""

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.short_prefill_first_tokens < 0:
            raise ConfigError(f"short_prefill_first_tokens {self.short_prefill_first_tokens} "
                              f"must be >= 0")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError(f"long_prefill_token_threshold "
                              f"{self.long_prefill_token_threshold} must be >= 0")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"scheduling_policy {self.scheduling_policy!r} is not one of "
                              f"{', '.join(SCHEDULING_POLICIES)}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens {self.max_num_batched_tokens} must be >= 1")
        if self.max_num_seqs is None:
            object.__setattr__(self, "max_num_seqs",
                               min(DEFAULT_MAX_NUM_SEQS, self.max_num_batched_tokens))
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs {self.max_num_seqs} must be >= 1")
        # vLLM's SchedulerConfig.verify_max_model_len: every running request needs at least
        # one token of a step's budget.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be greater than "
                f"or equal to max_num_seqs ({self.max_num_seqs})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len {self.max_model_len} must be >= 1")


@dataclass(frozen=True)
class TierSpec:
    """One tier below the device pool, parsed from `--kv-tier cpu:8GiB` or `disk:/path:100GiB`."""

    kind: str
    capacity_bytes: int
    path: str | None = None
    url: str | None = None
    eviction: str = "lru"

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.capacity_bytes < 1:
            raise ConfigError(f"kv tier {self.kind}: size {self.capacity_bytes} bytes must be "
                              f"positive")
        if self.kind == "disk" and not (self.path or "").strip():
            raise ConfigError("kv tier disk: the path is empty (expected disk:PATH:SIZE)")
        if self.kind == "redis":
            _check_redis_url(self.url or "")

    @staticmethod
    def parse(text: str) -> TierSpec:
        """Parse `cpu:SIZE[:policy]`, `disk:PATH:SIZE[:policy]`, `redis:URL:SIZE[:policy]`."""
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        parts = rest.split(":") if rest else []
        policy = "lru"
        if parts and parts[-1].lower() in ("lru", "s3fifo"):
            policy = parts.pop().lower()
        try:
            if kind == "cpu" and len(parts) == 1:
                return TierSpec("cpu", parse_size(parts[0]), eviction=policy)
            if kind == "disk" and len(parts) >= 2:
                return TierSpec("disk", parse_size(parts[-1]), path=":".join(parts[:-1]),
                                eviction=policy)
            if kind == "redis" and len(parts) >= 2:
                return TierSpec("redis", parse_size(parts[-1]),
                                url=_redis_url(":".join(parts[:-1])), eviction=policy)
        except ConfigError as exc:  # named with the whole spec, as given
            raise ConfigError(f"kv tier {text!r}: {exc}") from None
        raise ConfigError(
            f"kv tier {text!r}: expected cpu:SIZE, disk:PATH:SIZE or redis:URL:SIZE "
            "(optionally :lru or :s3fifo)")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(text: str) -> str:
    """A Redis URL as redis-py takes it; `host:port` alone means `redis://host:port`."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        # `redis://HOST:PORT:SIZE` comes here as `//HOST:PORT`: the tier's kind was the URL's
        # scheme. Read as `redis:////HOST:PORT`, redis-py would connect to localhost:6379.
        scheme, rest = "redis", text.removeprefix("//")
    host_missing = scheme.lower() != "unix" and rest.startswith("/")
    if scheme.lower() not in REDIS_SCHEMES or not rest.strip("/") or host_missing:
        raise ConfigError(f"redis tier URL {text!r}: expected redis://HOST:PORT[/DB], "
                          f"rediss://... or unix:///PATH")
    return f"{scheme.lower()}://{rest}"


def _check_redis_url(url: str) -> None:
    """Refuse a URL redis-py would misread or fail on only when the tier connects: there a
    bad port or option disabled the tier with a log line (or a TypeError, for an unknown
    `?option`, ended the start), and a database that is not a number (`/kv`) or port 0 was
    silently replaced by redis-py's default (db 0, port 6379): a store not asked for."""
    import redis  # here: the front ends import this module, and most runs have no redis tier

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"redis tier URL {url!r}: {exc}") from None
    if port == 0:
        raise ConfigError(f"redis tier URL {url!r}: port 0")
    if parts.scheme != "unix" and not re.fullmatch(r"/?(\d+)?", parts.path):
        raise ConfigError(f"redis tier URL {url!r}: the database "
                          f"{parts.path.lstrip('/')!r} is not a number")
    try:  # builds a connection object, which checks every `?option`; connects to nothing
        redis.ConnectionPool.from_url(url).make_connection()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"redis tier URL {url!r}: {exc}") from None


@dataclass(frozen=True)
class TierConfig:
    """The tier stack under the device prefix cache (empty = no tiers)."""

    kv_tiers: tuple[TierSpec, ...] = ()
    kv_tier_chunk_tokens: int = 256
    kv_store_policy: str = "lazy"
    kv_store_min_hits: int | str = "auto"
    """Store a chunk only once this many requests have contained it. `auto`: 1 while the
    workload reuses prefixes, 2 while it does not (under `AUTO_MIN_REUSE_RATE` of the last
    pool's worth of prompt blocks, and at least 32 requests, had been seen before), so a
    workload without reuse pays for no stores and a prefix that does come back is stored
    from its second use."""
    kv_load_timing: str = "same-step"
    """CUDA, host-memory tiers: `same-step` enqueues a hit's copy and has the step's forward
    wait for it on the device, so the request's prefill runs in the step that admitted it
    (the step grows by the part of a ~2 ms copy its host preparation does not hide);
    `next-step` runs the request only after the scheduler has seen the copy finish (the copy
    overlaps a whole step of other requests' compute; the request waits one step more).
    Disk and remote tiers always load in the background."""

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.kv_load_timing not in LOAD_TIMINGS:
            raise ConfigError(
                f"kv_load_timing {self.kv_load_timing!r} is not one of {', '.join(LOAD_TIMINGS)}")
        if self.kv_store_policy not in STORE_POLICIES:
            raise ConfigError(
                f"kv_store_policy {self.kv_store_policy!r} is not one of "
                f"{', '.join(STORE_POLICIES)}")
        if self.kv_tier_chunk_tokens < 1:
            raise ConfigError(f"kv_tier_chunk_tokens {self.kv_tier_chunk_tokens} must be >= 1")
        kinds = [spec.kind for spec in self.kv_tiers]
        for kind in dict.fromkeys(kinds):
            if kinds.count(kind) > 1:
                # The stack knows its tiers by kind (hit counts, the cost model's rates, the
                # metrics' labels): a second tier of a kind would be merged into the first.
                raise ConfigError(
                    f"kv_tiers: {kinds.count(kind)} {kind!r} tiers given; each kind may "
                    "appear once (one cpu, one disk and one redis tier at most)")
        hits = self.kv_store_min_hits
        if hits != "auto" and not (isinstance(hits, int) and not isinstance(hits, bool)
                                   and hits >= 1):
            raise ConfigError(f"kv_store_min_hits {hits!r} must be 'auto' or an integer >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is configured with."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    attention_backend: str = "auto"
    """torch (reference, CPU and CUDA), triton (CUDA), or auto."""
    enforce_eager: bool = False
    """Never capture CUDA graphs (like vLLM's --enforce-eager)."""
    max_cudagraph_capture_size: int = 1024
    """Largest step (in tokens) with prefill chunks that runs as piecewise CUDA graphs around
    attention (vLLM's compilation-config knob of that name); 0 runs such steps eagerly.
    Decode-only steps have their own full graphs either way. Above 1,024 tokens a step's
    kernels (~4 ms for a 1.5B model) hide most of the eager launch cost, and padding to coarser
    sizes would waste more."""

    overlap_outputs: bool = False
    """Server engine core: build and send step N's outputs while the device runs step N+1
    (scheduling still waits for step N's tokens). Off by default: on an H200 it served P
    5-10% faster, but one Q run had a worse TTFT with it (BENCHMARKS.md)."""

    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before reading step N's tokens (vLLM's --async-scheduling;
    the server's engine core and `LLM.generate`), so the host's scheduling, input staging and
    output work overlap the device's step. A decode's input is then its previous token, still
    on the device. A request that a stop token or string ends computes one more token, which
    is dropped. None (the default, as in recent vLLM): on where the device runs a step without
    the host (CUDA) unless `overlap_outputs` is set; off on the CPU, whose forward pass is the
    host's own work, so there is nothing to overlap (`resolved_async_scheduling`)."""

    batch_invariant: bool = False
    """Greedy output independent of how requests are batched and chunked (vLLM's
    VLLM_BATCH_INVARIANT, SGLang's --enable-deterministic-inference): every matmul and
    attention call computes a row the same way whatever step it runs in
    (CUDA: `triton_matmul`, `TritonAttentionBackend(batch_invariant=True)`; CPU: padded
    GEMMs, `InvariantTorchAttentionBackend`), so tier hits, preemptions and neighbours change
    no bits. Slower than the default kernels (BENCHMARKS.md); on CUDA it needs the triton
    attention backend."""

    def resolved_async_scheduling(self, device_type: str) -> bool:
        """Whether the engine on a `device_type` device schedules asynchronously."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device_type == "cuda" and not self.overlap_outputs

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.async_scheduling and self.overlap_outputs:
            raise ConfigError("async_scheduling already overlaps a step's outputs with the "
                              "next step; drop overlap_outputs")
        if self.max_cudagraph_capture_size < 0:
            raise ConfigError(f"max_cudagraph_capture_size {self.max_cudagraph_capture_size} "
                              "must be >= 0")
        if self.tiers.kv_tiers and not self.cache.enable_prefix_caching:
            # Tier entries are found by the prefix cache's block hashes: without it the
            # scheduler never looks the tiers up or stores into them, and they would hold host
            # memory, a disk folder's lock and a Redis connection for nothing, silently.
            raise ConfigError("kv_tiers need enable_prefix_caching (the tiers extend the "
                              "prefix cache); drop --no-enable-prefix-caching or the "
                              "--kv-tier flags")
        chunk, block = self.tiers.kv_tier_chunk_tokens, self.cache.block_size
        if self.tiers.kv_tiers and chunk % block:
            # A tier entry holds whole KV blocks: another chunk would be silently rounded.
            raise ConfigError(f"kv_tier_chunk_tokens {chunk} must be a multiple of block_size "
                              f"{block}")

    @staticmethod
    def from_kwargs(**kwargs: Any) -> EngineConfig:
        """Build from flat engine arguments (`LLM(**kwargs)`, CLI); unknown names raise."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, value in kwargs.items():
            section = _FIELD_SECTION.get(key)
            if section is None:
                if key in _TOP_LEVEL:
                    top[key] = value
                    continue
                known = ", ".join(sorted([*_FIELD_SECTION, *_TOP_LEVEL]))
                raise ConfigError(f"unknown engine argument {key!r}; known: {known}")
            sections[section][key] = value
        tiers = sections["tiers"]
        if "kv_tiers" in tiers:
            tiers["kv_tiers"] = _tier_specs(tiers["kv_tiers"])
        cache = sections["cache"]
        size = cache.get("kv_cache_memory_bytes")
        if size is not None and not isinstance(size, bool):
            try:
                cache["kv_cache_memory_bytes"] = parse_size(size)
            except ConfigError as exc:
                raise ConfigError(f"kv_cache_memory_bytes: {exc}") from None
        return EngineConfig(
            model=ModelConfig(**sections["model"]),
            cache=CacheConfig(**cache),
            scheduler=SchedulerConfig(**sections["scheduler"]),
            tiers=TierConfig(**tiers),
            **top,
        )


def _tier_specs(specs: Any) -> tuple[TierSpec, ...]:
    """`kv_tiers`: a list of specs (`["cpu:8GiB"]`) or TierSpecs, in tier order."""
    if specs is None:
        return ()
    if isinstance(specs, (str, TierSpec)) or not isinstance(specs, (list, tuple)):
        raise ConfigError(f"kv_tiers {specs!r} must be a list of tier specs, e.g. "
                          "['cpu:8GiB']")
    for spec in specs:
        if not isinstance(spec, (str, TierSpec)):
            raise ConfigError(f"kv_tiers: tier {spec!r} must be a spec string (e.g. "
                              "'cpu:8GiB') or a TierSpec")
    return tuple(spec if isinstance(spec, TierSpec) else TierSpec.parse(spec)
                 for spec in specs)


_TOP_LEVEL = ("attention_backend", "enforce_eager", "max_cudagraph_capture_size",
              "overlap_outputs", "async_scheduling", "batch_invariant")
_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "tiers": TierConfig}
_FIELD_SECTION = {f.name: name for name, cls in _SECTIONS.items()
                  for f in dataclasses.fields(cls)}
