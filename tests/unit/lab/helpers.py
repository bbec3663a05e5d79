"""Factories for lab tests: records built from hand-made request outputs."""

from __future__ import annotations

from typing import Any

from kvtier.bench.metrics import RequestFuncOutput, compute_result
from kvtier.lab.records import RunRecord


def outputs(ttfts_s: list[float], itl_s: float = 0.01, num_tokens: int = 4,
            prompt_len: int = 100, failed: int = 0) -> list[RequestFuncOutput]:
    """Successful requests with the given TTFTs (regular ITL), then `failed` failures."""
    done = [RequestFuncOutput(success=True, prompt_len=prompt_len, output_tokens=num_tokens,
                              start_time=float(i), ttft=t, itl=[itl_s] * (num_tokens - 1),
                              latency=t + itl_s * (num_tokens - 1))
            for i, t in enumerate(ttfts_s)]
    return done + [RequestFuncOutput(error="HTTP 500 Internal Server Error: boom")] * failed


def record(server: str, workload: str, ttfts_s: list[float], duration_s: float = 10.0,
           failed: int = 0, **extra: Any) -> RunRecord:
    result = compute_result(outputs(ttfts_s, failed=failed), duration_s)
    return RunRecord.from_result(server, workload, result, **extra)


def kvtier_stats(prompt: int, device: int, cpu: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "matched_tokens": device + cpu,
            "computed_tokens": prompt - device - cpu, "num_preemptions": 0,
            "tier_hit_tokens": {"device": device, "cpu": cpu}}
