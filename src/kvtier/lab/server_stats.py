"""What a kvtier server says a run did: prompt tokens matched per tier, bytes moved, preemptions.

Input is the change of every Prometheus sample over the measured phase (`BenchmarkResult.
server_metrics`, keys like `kvtier:tier_hit_tokens_total{model_name="m",tier="cpu"}`). The
names are the ones `kvtier.server.metrics` exports: `prefix_cache_hits` counts every matched
prompt token (device and tiers), `tier_hit_tokens{tier=}` the part each lower tier served, so
the device's share is the difference. Servers without `kvtier:` series (vLLM, SGLang) get no
summary. Labels other than `tier` and `finished_reason` (the `model_name` every series
carries, as vLLM's do) are summed over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PREFIX = "kvtier:"
_LABEL = re.compile(r'^(?P<name>[^{]+)\{(?P<labels>.*)\}$')


@dataclass
class KvtierRunStats:
    """Server-side counters of one run (token counts, bytes)."""

    num_requests: int = 0
    """Finished requests, all reasons."""
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    """Prompt tokens the server received (prefilled or matched)."""
    generation_tokens: int = 0
    matched_tokens: int = 0
    """Prompt tokens served from any cache (device prefix cache + tiers)."""
    tier_hit_tokens: dict[str, int] = field(default_factory=dict)
    """Tier name -> prompt tokens that tier served; includes "device"."""
    tier_loaded_bytes: dict[str, int] = field(default_factory=dict)
    tier_stored_bytes: dict[str, int] = field(default_factory=dict)
    num_preemptions: int = 0
    num_steps: int = 0
    """Engine steps (forward passes) the run took: with equal work, more steps mean smaller
    batches (admission held back, smaller decode batches)."""
    num_decode_only_steps: int = 0
    """Of num_steps, those of decode tokens only."""
    num_prompt_steps: int = 0
    """Of num_steps, those with prompt tokens (the rest ran nothing)."""
    decode_only_step_s: float = 0.0
    """Sum of the decode-only steps' launch-to-tokens times (under async scheduling, step
    periods)."""
    prompt_step_s: float = 0.0
    ttft_s: float = 0.0
    """Sum over requests of the server's TTFT (arrival at the HTTP handler, before
    tokenisation, to the first token applied in the engine core)."""
    queue_time_s: float = 0.0
    """Sum over requests of vLLM's queue time: received by the engine core to first
    scheduled (waiting for the step in flight, then for one that takes the request)."""
    prefill_time_s: float = 0.0
    """Sum over requests of first scheduled to first token (tier loads included)."""
    tokenize_time_s: float = 0.0
    """Sum over requests of arrival at the HTTP handler to the prompt's token ids: the
    front end's tokenisation (and chat template), part of its share of the TTFT."""
    num_tokenized: int = 0
    """Requests `tokenize_time_s` covers: those the engine took (one per HTTP request, whatever
    its number of choices), refused ones left out."""
    num_first_tokens: int = 0
    """Requests the sums cover."""

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the server had to prefill."""
        return self.prompt_tokens - self.matched_tokens

    @property
    def matched_fraction(self) -> float:
        return self.matched_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mean_prompt_step_ms(self) -> float | None:
        """A step with prompt tokens, on average: a decoding stream waits through these when
        decodes and prefills run in separate steps, so they shape its ITL tail."""
        return (1e3 * self.prompt_step_s / self.num_prompt_steps if self.num_prompt_steps
                else None)

    @property
    def mean_decode_step_ms(self) -> float | None:
        return (1e3 * self.decode_only_step_s / self.num_decode_only_steps
                if self.num_decode_only_steps else None)

    @property
    def mean_server_ttft_ms(self) -> float | None:
        return 1e3 * self.ttft_s / self.num_first_tokens if self.num_first_tokens else None

    @property
    def mean_queue_time_ms(self) -> float | None:
        return 1e3 * self.queue_time_s / self.num_first_tokens if self.num_first_tokens else None

    @property
    def mean_prefill_time_ms(self) -> float | None:
        return (1e3 * self.prefill_time_s / self.num_first_tokens if self.num_first_tokens
                else None)

    @property
    def mean_tokenize_ms(self) -> float | None:
        return 1e3 * self.tokenize_time_s / self.num_tokenized if self.num_tokenized else None

    @property
    def mean_front_end_ms(self) -> float | None:
        """The rest of the server's TTFT: parsing, tokenisation, the hop to the core."""
        if not self.num_first_tokens:
            return None
        rest = self.ttft_s - self.queue_time_s - self.prefill_time_s
        return 1e3 * rest / self.num_first_tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(computed_tokens=self.computed_tokens, matched_fraction=self.matched_fraction,
                    mean_prompt_step_ms=self.mean_prompt_step_ms,
                    mean_decode_step_ms=self.mean_decode_step_ms,
                    mean_server_ttft_ms=self.mean_server_ttft_ms,
                    mean_queue_time_ms=self.mean_queue_time_ms,
                    mean_prefill_time_ms=self.mean_prefill_time_ms,
                    mean_front_end_ms=self.mean_front_end_ms,
                    mean_tokenize_ms=self.mean_tokenize_ms)
        return data


def is_kvtier(samples: Mapping[str, float] | None) -> bool:
    return bool(samples) and any(key.startswith(PREFIX) for key in samples or {})


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """`name{a="1",b="2"}` -> ("name", {"a": "1", "b": "2"})."""
    match = _LABEL.match(key)
    if not match:
        return key, {}
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"]))
    return match["name"], labels


def summarize(diff: Mapping[str, float] | None) -> KvtierRunStats | None:
    """Fold a kvtier /metrics diff into KvtierRunStats; None for other servers."""
    if not is_kvtier(diff):
        return None
    stats = KvtierRunStats()
    for key, value in (diff or {}).items():
        name, labels = split_key(key)
        if not name.startswith(PREFIX):
            continue
        _fold(stats, name[len(PREFIX):], labels, value)
    stats.num_requests = sum(stats.finished_by_reason.values())
    device = stats.matched_tokens - sum(stats.tier_hit_tokens.values())
    stats.tier_hit_tokens = {"device": device, **stats.tier_hit_tokens}
    return stats


_SCALARS = {
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "prefix_cache_hits_total": "matched_tokens",
    "num_preemptions_total": "num_preemptions",
    "engine_steps_total": "num_steps",
    "engine_decode_only_steps_total": "num_decode_only_steps",
    "engine_prompt_steps_total": "num_prompt_steps",
    "time_to_first_token_seconds_count": "num_first_tokens",
    "request_tokenize_time_seconds_count": "num_tokenized",
}
"""Counters of tokens and events: whole numbers."""
_SECONDS = {
    "time_to_first_token_seconds_sum": "ttft_s",
    "request_queue_time_seconds_sum": "queue_time_s",
    "request_prefill_time_seconds_sum": "prefill_time_s",
    "request_tokenize_time_seconds_sum": "tokenize_time_s",
    "engine_decode_only_step_seconds_total": "decode_only_step_s",
    "engine_prompt_step_seconds_total": "prompt_step_s",
}
"""Latency sums: kept as they are."""
_PER_TIER = {
    "tier_hit_tokens_total": "tier_hit_tokens",
    "tier_loaded_bytes_total": "tier_loaded_bytes",
    "tier_stored_bytes_total": "tier_stored_bytes",
}


def _fold(stats: KvtierRunStats, name: str, labels: dict[str, str], sample: float) -> None:
    """Add one sample into `stats` (series that differ in other labels add up)."""
    tier = labels.get("tier", "")
    if name in _SCALARS:
        field_name = _SCALARS[name]
        setattr(stats, field_name, getattr(stats, field_name) + int(round(sample)))
    elif name in _SECONDS:
        field_name = _SECONDS[name]
        setattr(stats, field_name, getattr(stats, field_name) + sample)
    elif name in _PER_TIER and tier:
        _add(getattr(stats, _PER_TIER[name]), tier, sample)
    elif name == "request_success_total":
        _add(stats.finished_by_reason, labels.get("finished_reason", "?"), sample)


def _add(counts: dict[str, int], key: str, sample: float) -> None:
    counts[key] = counts.get(key, 0) + int(round(sample))


def format_stats(stats: KvtierRunStats, client_prompt_tokens: int | None = None) -> str:
    """A few lines for the terminal: matched vs sent, per-tier hit tokens, bytes moved."""
    sent = stats.prompt_tokens
    lines = ["{s:{c}^{n}}".format(s=" kvtier server counters (this run) ", n=50, c="-"),
             f"{'Requests finished (server):':<40} {stats.num_requests}",
             f"{'Prompt tokens received (server):':<40} {sent}"]
    if client_prompt_tokens is not None:
        lines.append(f"{'Prompt tokens sent (client usage):':<40} {client_prompt_tokens}")
    lines.append(f"{'Prompt tokens matched (all caches):':<40} {stats.matched_tokens} "
                 f"({stats.matched_fraction:.1%})")
    for tier, tokens in stats.tier_hit_tokens.items():
        share = tokens / sent if sent else 0.0
        lines.append(f"{'  hit tokens, ' + tier + ':':<40} {tokens} ({share:.1%})")
    lines.append(f"{'Prompt tokens computed:':<40} {stats.computed_tokens}")
    for tier in sorted(set(stats.tier_loaded_bytes) | set(stats.tier_stored_bytes)):
        loaded = stats.tier_loaded_bytes.get(tier, 0) / 2**20
        stored = stats.tier_stored_bytes.get(tier, 0) / 2**20
        lines.append(f"{'  ' + tier + ' MiB loaded / stored:':<40} {loaded:.1f} / {stored:.1f}")
    lines.append(f"{'Generated tokens (server):':<40} {stats.generation_tokens}")
    lines.append(f"{'Preemptions:':<40} {stats.num_preemptions}")
    lines.append(f"{'Engine steps:':<40} {stats.num_steps}")
    for label, value in (("  with prompt tokens, mean ms:", stats.mean_prompt_step_ms),
                         ("  decode-only, mean ms:", stats.mean_decode_step_ms)):
        if value is not None:
            lines.append(f"{label:<40} {value:.2f}")
    return "\n".join(lines)
