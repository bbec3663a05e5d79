"""The latency histograms' buckets are vLLM's, so dashboards and alerts built for vLLM's
`/metrics` read kvtier's the same way."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.engine.async_types import EngineSnapshot
from kvtier.engine.stats import EngineStats
from kvtier.server.metrics import ServerMetrics

# vLLM's v1 PrometheusStatLogger, written out here (not imported from our module) so that a
# change on our side fails this test.
VLLM_REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0]


@pytest.mark.parametrize(("name", "buckets"), [
    ("time_to_first_token_seconds", VLLM_TTFT),
    ("inter_token_latency_seconds", VLLM_ITL),
    ("e2e_request_latency_seconds", VLLM_REQUEST_LATENCY),
    # these two had the TTFT buckets, where vLLM uses its request-latency ones
    ("request_queue_time_seconds", VLLM_REQUEST_LATENCY),
    ("request_prefill_time_seconds", VLLM_REQUEST_LATENCY),
])
def test_latency_histograms_use_vllms_buckets(monkeypatch: pytest.MonkeyPatch, name: str,
                                              buckets: list[float]) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = ServerMetrics(lambda: EngineSnapshot(EngineStats(), 10, 10, 0), "m")
    text = generate_latest(metrics.registry).decode()
    bounds = [sample.labels["le"] for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == f"kvtier:{name}_bucket"]
    assert bounds == [*(str(float(b)) for b in buckets), "+Inf"]
