"""Scrape a server's Prometheus `/metrics` text into flat samples, and diff two scrapes.

Server-side counters (prefix-cache hits, tier hit tokens, bytes moved, preemptions) explain the
client-side figures; the run scrapes before and after the measured phase and keeps the change.
Keys are the sample name plus its sorted labels, e.g.
`kvtier:tier_hit_tokens_total{model_name="m",tier="cpu"}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, float]


def parse_metrics_text(text: str) -> Samples:
    """Every sample of an exposition text as {name{labels}: value}; NaN samples are dropped."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if math.isnan(sample.value):
                continue
            samples[sample_key(sample.name, sample.labels)] = float(sample.value)
    return samples


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """`name{a="1",b="2"}` with labels sorted, or the bare name without labels."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def diff_samples(before: Samples, after: Samples) -> Samples:
    """after − before for every sample present after (missing before counts as 0).

    Meaningful for counters, histogram buckets/sums/counts; for a gauge it is the change too.
    """
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


async def scrape_metrics(session: aiohttp.ClientSession, base_url: str,
                         path: str = "/metrics", timeout_s: float = 10.0) -> Samples | None:
    """GET `base_url + path` and parse it; None when the endpoint is missing or unreadable."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.get(base_url.rstrip("/") + path, timeout=timeout) as response:
            if response.status != 200:
                return None
            return parse_metrics_text(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
