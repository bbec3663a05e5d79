"""Throughput and token gaps of the engine process on a simulated device (issue 6).

Run with the simulated device (see sitecustomize.py here): a spawned engine process serves 256
P-shaped requests (16 prefixes of 512 tokens + 32, output 64, 64 at a time) to an in-process
consumer, no HTTP, and this prints req/s and the gaps between a request's outputs.

    KVTIER_SIM_STEP_S=0.003 PYTHONPATH=scripts/simulated_device:src \\
        .venv/bin/python scripts/simulated_device/stream_gaps.py
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from kvtier import SamplingParams
from kvtier.config import EngineConfig
from kvtier.engine.async_engine import AsyncEngine


async def main() -> None:
    config = EngineConfig.from_kwargs(num_gpu_blocks_override=4096,
                                      max_num_batched_tokens=8192, max_num_seqs=256,
                                      scheduling_policy="lpm")
    engine = AsyncEngine.spawn(config)
    engine.start()
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 30_000) for _ in range(512)] for _ in range(16)]
    prompts = [prefixes[rng.randrange(16)] + [rng.randrange(1000, 30_000) for _ in range(32)]
               for _ in range(256)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    gaps: list[float] = []
    slots = asyncio.Semaphore(64)

    async def one(prompt: list[int]) -> None:
        async with slots:
            last = None
            async for _ in engine.generate(prompt, params):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    await engine.shutdown()
    print(f"req/s {len(prompts) / wall:.1f}  gap median {1e3 * statistics.median(gaps):.2f} ms"
          f"  mean {1e3 * statistics.mean(gaps):.2f} ms"
          f"  under 0.3 ms {sum(g < 3e-4 for g in gaps) / len(gaps):.0%}")


if __name__ == "__main__":
    asyncio.run(main())
