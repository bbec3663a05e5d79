"""Workload Q's shape on a simulated device: time to first token with the engine core's
synchronous turn and with `--overlap-outputs` (issue 6).

A spawned engine process serves Q-shaped requests (64 prefixes of 4,096 tokens + 256, output
32, 4 at a time) to an in-process consumer, no HTTP and no tokeniser. Run it with the simulated
device (sitecustomize.py here) and a per-token cost, so that a 4,352-token prefill "takes"
~29 ms and a small decode ~2.3 ms, as on an H200:

    KVTIER_SIM_STEP_S=0.0023 KVTIER_SIM_TOKEN_S=0.0000061 \\
        PYTHONPATH=scripts/simulated_device:src .venv/bin/python scripts/simulated_device/q_ttft.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from kvtier import SamplingParams
from kvtier.config import EngineConfig
from kvtier.engine.async_engine import AsyncEngine


async def serve(overlap: bool, num_prompts: int, threshold: int) -> dict[str, float]:
    config = EngineConfig.from_kwargs(dtype="bfloat16", num_gpu_blocks_override=4096,
                                      max_num_batched_tokens=8192, scheduling_policy="lpm",
                                      overlap_outputs=overlap,
                                      long_prefill_token_threshold=threshold)
    engine = AsyncEngine.spawn(config)
    engine.start()
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 30_000) for _ in range(4096)] for _ in range(64)]
    prompts = [prefixes[rng.randrange(64)] + [rng.randrange(1000, 30_000) for _ in range(256)]
               for _ in range(num_prompts)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    slots = asyncio.Semaphore(4)

    async def one(prompt: list[int]) -> None:
        async with slots:
            sent = time.perf_counter()
            first = True
            async for _ in engine.generate(prompt, params):
                if first:
                    ttfts.append(time.perf_counter() - sent)
                    first = False

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    await engine.shutdown()
    ttfts.sort()
    return {"req_s": num_prompts / wall, "ttft_mean_ms": 1e3 * statistics.mean(ttfts),
            "ttft_median_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * ttfts[int(0.99 * (len(ttfts) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=0)
    args = parser.parse_args()
    for _ in range(args.pairs):  # interleaved: this machine's speed drifts between runs
        for overlap in (False, True):
            result = asyncio.run(serve(overlap, args.num_prompts,
                                       args.long_prefill_token_threshold))
            print("overlapped" if overlap else "sync      ",
                  "  ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
