"""The benchmark lab: `vllm bench serve` semantics against any OpenAI-compatible server.

Imports only the standard library, numpy, aiohttp, tokenizers, prometheus_client and
`kvtier.utils` (never torch or the engine), so it measures kvtier, vLLM and SGLang alike.

    datasets.py   seeded generators (prefix_repetition, random, multi_turn, long_doc_qa)
    sharegpt.py   stream-parse the truncated ShareGPT dump + vLLM's sampling and filters
    config.py     BenchConfig (vLLM option names) and build_workload
    client.py     run_benchmark: streaming HTTP, arrivals, concurrency, warm-ups
    sse.py        SSE parser and per-request stream recorder (pure)
    metrics.py    RequestFuncOutput -> BenchmarkResult, vLLM's JSON and summary (pure)
    prometheus.py scrape and diff a /metrics endpoint
"""

from kvtier.bench.client import arrival_times, run_benchmark, stream_request
from kvtier.bench.config import BenchConfig, build_workload
from kvtier.bench.datasets import Conversation, SampleRequest, Workload
from kvtier.bench.metrics import (
    BenchmarkResult,
    RequestFuncOutput,
    compute_result,
    format_summary,
)
from kvtier.utils.tokenizer_json import HFTokenizer, load_tokenizer

__all__ = [
    "BenchConfig", "BenchmarkResult", "Conversation", "HFTokenizer", "RequestFuncOutput",
    "SampleRequest", "Workload", "arrival_times", "build_workload", "compute_result",
    "format_summary", "load_tokenizer", "run_benchmark", "stream_request",
]
