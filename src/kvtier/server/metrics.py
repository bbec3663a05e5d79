"""Prometheus metrics for `/metrics`, named like vLLM's with a `kvtier:` prefix.

Every series carries vLLM's `model_name` label (the served model name, the first of
--served-model-name), before any label of its own (`tier`, `finished_reason`), so dashboards
and alerts that select or aggregate by `model_name` work on kvtier too. vLLM's `engine` label
(its data-parallel engine index) is left out: kvtier runs one engine.

Two sources, one per-app `CollectorRegistry` (no global registry, so several apps can live in
one process, e.g. in tests):

- counters and gauges are read at scrape time from the engine's last published snapshot
  (`EngineStats`, its tier stats and the KV pool), so they can never drift from the engine;
- latency histograms (TTFT, inter-token, end-to-end, queue time) are observed by an output
  listener on the engine thread, before the outputs reach their clients. With several
  front-end processes (`--api-server-count`) each observes its own requests into
  prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set by the
  supervisor), and any front end's scrape adds them all up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kvtier.engine.async_engine import EngineSnapshot
from kvtier.types import RequestOutput

PREFIX = "kvtier:"
MODEL_NAME_LABEL = "model_name"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# (metric suffix, TierStats field, help) for each lower tier, labelled tier="cpu" etc.
_TIER_COUNTERS = (
    ("tier_stored_bytes", "num_stored_bytes", "Bytes written to the tier."),
    ("tier_stored_entries", "num_stored_entries", "Entries written to the tier."),
    ("tier_loaded_bytes", "num_loaded_bytes", "Bytes read back from the tier."),
    ("tier_hit_blocks", "num_hit_blocks", "KV blocks served from the tier."),
    ("tier_evictions", "num_evictions", "Entries evicted from the tier."),
    ("tier_never_read_evictions", "num_never_read_evictions",
     "Entries evicted from the tier without ever being read."),
    ("tier_errors", "num_errors", "Failed tier operations (each cost a recompute)."),
    ("tier_rejected_stores", "num_rejected", "Stores the tier refused."),
)
_TIER_GAUGES = (
    ("tier_used_bytes", "used_bytes", "Bytes the tier's entries occupy (a shared redis tier: "
     "those this replica knows of)."),
    ("tier_capacity_bytes", "capacity_bytes", "The tier's capacity in bytes."),
)
_MANAGER_COUNTERS = (
    ("tier_loads", "num_loads", "Loads from lower tiers into device KV blocks."),
    ("tier_load_seconds", "load_seconds", "Seconds spent loading from lower tiers."),
    ("tier_rejected_min_hits", "num_rejected_min_hits",
     "Chunks not stored: fewer requests than kv_store_min_hits had contained them."),
    ("tier_rejected_cost", "num_rejected_cost",
     "Chunks not stored or hits not loaded because recomputing was predicted cheaper."),
    ("evicted_unsaved_blocks", "num_evicted_unsaved_blocks",
     "Device blocks evicted with no copy in any tier."),
    ("tier_stores_at_eviction", "num_stores_at_eviction",
     "Lazy-store chunks copied down at their eviction (the lookahead had not reached them)."),
)


_ENGINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prompt_tokens", "num_prompt_tokens", "Prompt tokens prefilled or served from cache."),
    ("generation_tokens", "num_generation_tokens", "Generated tokens."),
    ("prefix_cache_queries", "num_prefix_cache_queried_tokens",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "num_prefix_cache_hit_tokens",
     "Prompt tokens served from the prefix cache (device and tiers)."),
    ("num_preemptions", "num_preemptions", "Requests preempted for KV space."),
    ("engine_steps", "num_steps", "Engine steps run (each one forward pass)."),
    ("engine_decode_only_steps", "num_decode_only_steps",
     "Engine steps of decode tokens only."),
    ("engine_prompt_steps", "num_prompt_steps",
     "Engine steps with prompt tokens (prefill chunks), decodes or not beside them."),
    ("engine_decode_only_step_seconds", "decode_only_step_seconds",
     "Decode-only steps' time from launch to tokens read (under async scheduling, the step "
     "period)."),
    ("engine_prompt_step_seconds", "prompt_step_seconds",
     "Steps with prompt tokens: time from launch to tokens read (under async scheduling, the "
     "step period)."),
)
"""(kvtier: name before _total, EngineStats field, help) of the engine's counters."""


class _SnapshotCollector(Collector):
    """Counters and gauges straight from the engine's published snapshot."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self._snapshot = snapshot
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        stats = snap.stats
        gauge, counter = self._gauge, self._counter
        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                    stats.num_waiting)
        yield gauge("num_requests_loading", "Requests waiting for KV from a lower tier.",
                    stats.num_loading)
        yield gauge("kv_cache_usage_perc", "Fraction of device KV blocks held by requests "
                    "(1 = full).", stats.kv_usage)
        yield gauge("kv_cache_free_blocks", "Device KV blocks free to allocate (cached but "
                    "unreferenced blocks included).", snap.num_free_blocks)
        yield gauge("kv_cache_total_blocks", "Device KV blocks in the pool.",
                    snap.num_total_blocks)
        for suffix, field, help_text in _ENGINE_COUNTERS:
            yield counter(suffix, help_text, getattr(stats, field))
        finished = CounterMetricFamily(PREFIX + "request_success", "Finished requests by reason.",
                                       labels=[MODEL_NAME_LABEL, "finished_reason"])
        for reason, count in _finished_by_reason(stats.num_finished).items():
            finished.add_metric([self._model_name, reason], count)
        yield finished
        yield from self._tiers(snap)

    def _tiers(self, snap: EngineSnapshot) -> Iterator[Metric]:
        stats = snap.stats
        labels = [MODEL_NAME_LABEL, "tier"]
        for suffix, field, help_text in _TIER_COUNTERS:
            family = CounterMetricFamily(PREFIX + suffix, help_text, labels=labels)
            for tier, tier_stats in sorted(stats.tiers.items()):
                family.add_metric([self._model_name, tier], float(getattr(tier_stats, field)))
            yield family
        for suffix, field, help_text in _TIER_GAUGES:
            gauge = GaugeMetricFamily(PREFIX + suffix, help_text, labels=labels)
            for tier, tier_stats in sorted(stats.tiers.items()):
                gauge.add_metric([self._model_name, tier], float(getattr(tier_stats, field)))
            yield gauge
        hits = CounterMetricFamily(PREFIX + "tier_hit_tokens", "Prompt tokens served from each "
                                   "lower tier.", labels=labels)
        for tier, count in sorted(stats.num_tier_hit_tokens.items()):
            hits.add_metric([self._model_name, tier], float(count))
        yield hits
        manager = stats.tier_manager
        if manager is not None:
            for suffix, field, help_text in _MANAGER_COUNTERS:
                yield self._counter(suffix, help_text, float(getattr(manager, field)))
            yield self._gauge("tier_reuse_rate", "Share of recent prompt blocks that an earlier "
                              "request had contained.", manager.reuse_rate)
            yield self._gauge("tier_store_min_hits", "Requests that must contain a chunk "
                              "before it is stored (--kv-store-min-hits auto moves it).",
                              manager.store_min_hits)

    def _gauge(self, name: str, help_text: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=[MODEL_NAME_LABEL])
        gauge.add_metric([self._model_name], float(value))
        return gauge

    def _counter(self, name: str, help_text: str, value: float) -> CounterMetricFamily:
        counter = CounterMetricFamily(PREFIX + name, help_text, labels=[MODEL_NAME_LABEL])
        counter.add_metric([self._model_name], float(value))
        return counter


def _finished_by_reason(num_finished: dict[str, int]) -> dict[str, int]:
    """Every reason shows up from the start (0), so rate() works on the first increment."""
    return {"stop": 0, "length": 0, "abort": 0, **num_finished}


class ServerMetrics:
    """The app's registry: snapshot collector plus latency histograms."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        """`model_name`: the served model name, every series' `model_name` label."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(snapshot, model_name))
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared_dir:  # histograms from every front-end process's files
            MultiProcessCollector(self.registry, path=shared_dir)
        # In multiprocess mode the histograms write to their process's file and the collector
        # reads them; registering them as well would count this process twice.
        registry = None if shared_dir else self.registry

        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
            """The histogram's one child, labelled with the model (made now: its zero series
            shows from the first scrape, as an unlabelled histogram's would)."""
            return Histogram(PREFIX + name, help_text, labelnames=[MODEL_NAME_LABEL],
                             buckets=buckets, registry=registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Arrival to first generated token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between two generated tokens of one request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Arrival to the request's end (any finish reason).", E2E_BUCKETS)
        # vLLM's split of the server's TTFT: queued in the engine core -> first scheduled ->
        # first token; what comes before "queued" is the front end's (parsing, tokenisation,
        # the hop to the core's process).
        # vLLM gives these two its request-latency buckets (the e2e ones): queueing under
        # load runs to minutes, past the TTFT buckets' fine steps.
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Received by the engine core to first scheduled.",
                                    E2E_BUCKETS)
        self.tokenize_time = histogram("request_tokenize_time_seconds",
                                       "Arrival at the HTTP handler to the prompt's token ids "
                                       "(chat template included): the front end's share "
                                       "before the hop to the core. Requests the engine took "
                                       "only.", TTFT_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "First scheduled to first token (tier loads included).",
                                      E2E_BUCKETS)
        self._last_token_time: dict[str, float] = {}

    def observe(self, outputs: list[RequestOutput], now: float) -> None:
        """Output listener (engine thread): one call per step with that step's outputs."""
        for output in outputs:
            request_id, metrics = output.request_id, output.metrics
            if output.new_token_ids:
                last = self._last_token_time.get(request_id)
                if last is None:
                    if metrics.first_token_time is not None:
                        self.ttft.observe(metrics.first_token_time - metrics.arrival_time)
                    scheduled = metrics.first_scheduled_time
                    if scheduled is not None:
                        queued = metrics.queued_time or metrics.arrival_time
                        self.queue_time.observe(scheduled - queued)
                        if metrics.first_token_time is not None:
                            self.prefill_time.observe(metrics.first_token_time - scheduled)
                else:
                    self.itl.observe(now - last)
                self._last_token_time[request_id] = now
            if output.finished:
                self._last_token_time.pop(request_id, None)
                end = metrics.finished_time if metrics.finished_time is not None else now
                self.e2e.observe(end - metrics.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
