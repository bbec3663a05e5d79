"""Where a serving step's time goes on the GPU (issue 6): kernels, host overhead, the engine.

One run prints (and writes to --out as JSON):
- decode-only steps of the Qwen2.5-1.5B shape at the seed workloads' contexts (4,352 tokens):
  CUDA-graph replay time next to its floor (weights + K/V bytes at the measured copy rate),
  the engine step's wall time, and the kernel breakdown of one replay;
- the kernel breakdown of a prefill step (8,192 new tokens) and of an extend step (256 new
  tokens after a cached 4,096-token prefix, next to running decodes);
- an in-process replay of workload P (no HTTP): req/s and where each step's host time goes
  (schedule, runner launch, waiting for the GPU's sampled tokens, state update, outputs).

    PYTHONPATH=src python3 scripts/profile_gpu_engine.py --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script
from torch.profiler import ProfilerActivity, profile

MODEL = "random:qwen2.5-1.5b"
KV_BYTES_PER_TOKEN = 28 * 2 * 2 * 128 * 2
"""Qwen2.5-1.5B: 28 layers x (K, V) x 2 KV heads x 128 dims x bf16."""


def copy_gbs() -> float:
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(big)
    return 2 * big.numel() / cuda_time(lambda: other.copy_(big), repeat=5) / 1e9


def kernel_table(fn: Callable[[], Any], rows: int = 25) -> list[dict]:
    """Per-kernel GPU time of one call of fn (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(
            event, "self_cuda_time_total", 0)
        if device_us > 0:
            table.append({"name": event.key[:90], "calls": event.count,
                          "us": round(device_us, 1)})
    table.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in table)
    print(f"  kernels total {total / 1e3:.3f} ms", flush=True)
    for r in table[:rows]:
        print(f"  {r['us']:9.1f} us {r['calls']:5d}x  {r['name']}", flush=True)
    return [{"total_us": round(total, 1)}] + table[:rows]


def fill_decodes(engine: Any, batch: int, context: int, seed: int = 7) -> None:
    """Admit `batch` requests of `context` tokens and run until all are decoding."""
    from kvtier import SamplingParams
    rng = random.Random(seed)
    for _ in range(batch):
        engine.add_request([rng.randrange(1000, 100_000) for _ in range(context)],
                           SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()


def abort_all(engine: Any) -> None:
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)


def decode_section(report: dict, gbs: float) -> None:
    from kvtier import LLM
    llm = LLM(MODEL, max_num_batched_tokens=8192, max_num_seqs=64, gpu_memory_utilization=0.6)
    engine = llm.engine
    spec = engine.spec
    weight_bytes = (spec.num_parameters - (0 if spec.tie_word_embeddings else 0)) * 2
    graphs = engine.runner.graphs
    assert graphs is not None
    for batch, context in ((1, 512), (1, 4352), (4, 4352), (16, 4352), (32, 4352)):
        fill_decodes(engine, batch, context)
        walls = []
        for _ in range(30):
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - started)
        size = next(s for s in graphs.sizes if s >= batch)
        replay_s = cuda_time(graphs._graphs[size].replay, repeat=20)
        floor_s = (weight_bytes + batch * context * KV_BYTES_PER_TOKEN) / (gbs * 1e9)
        key = f"decode_b{batch}_ctx{context}"
        report[key] = {"graph_ms": replay_s * 1e3, "step_wall_ms": statistics.median(walls) * 1e3,
                       "floor_ms": floor_s * 1e3, "graph_size": size}
        print(key, json.dumps(report[key]), flush=True)
        if batch in (1, 16):
            print(f" kernels of one replay, batch {batch} (padded to {size}):", flush=True)
            report[key]["kernels"] = kernel_table(graphs._graphs[size].replay)
        abort_all(engine)

    # Prefill 8,192 new tokens: one engine step, eager.
    rng = random.Random(11)

    def prefill_step() -> None:
        from kvtier import SamplingParams
        engine.reset_prefix_cache()
        engine.add_request([rng.randrange(1000, 100_000) for _ in range(8192)],
                           SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
    print(" kernels of a prefill step, 8,192 tokens:", flush=True)
    report["prefill_8192_kernels"] = kernel_table(prefill_step)
    report["prefill_8192_ms"] = cuda_time(prefill_step, repeat=5, warmup=1) * 1e3
    print("prefill_8192_ms", report["prefill_8192_ms"], flush=True)

    # Extend: 256 new tokens after a cached 4,096-token prefix (one step, eager, alone).
    from kvtier import SamplingParams
    prefix = [rng.randrange(1000, 100_000) for _ in range(4096)]
    llm.generate([prefix + [5]], SamplingParams(max_tokens=1, temperature=0.0))

    def extend_step() -> None:
        engine.add_request(prefix + [rng.randrange(1000, 100_000) for _ in range(256)],
                           SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
    print(" kernels of an extend step, 256 tokens after 4,096 cached:", flush=True)
    report["extend_256_kernels"] = kernel_table(extend_step)
    walls = []
    for _ in range(10):
        torch.cuda.synchronize()
        started = time.perf_counter()
        extend_step()
        walls.append(time.perf_counter() - started)
    report["extend_256_wall_ms"] = statistics.median(walls) * 1e3
    report["extend_256_gpu_ms"] = cuda_time(extend_step, repeat=10) * 1e3
    print("extend_256 wall / gpu ms", report["extend_256_wall_ms"], report["extend_256_gpu_ms"],
          flush=True)


class PhaseTimer:
    """Wraps methods of live objects, adding their wall time (and calls) to named totals."""

    def __init__(self) -> None:
        self.totals: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - started
                self.calls[name] += 1
        setattr(owner, attr, timed)

    def per_call(self) -> dict[str, dict[str, float]]:
        """Calls, total ms and mean us per name, the costliest first."""
        return {name: {"calls": self.calls[name], "total_ms": round(1e3 * total, 1),
                       "mean_us": round(1e6 * total / self.calls[name], 1)}
                for name, total in self.totals.most_common()}


def sharegpt_shaped(num_prompts: int, rng: random.Random, path: str | None = None,
                    ) -> list[tuple[list[int], Any]]:
    """Workload S's requests as token ids: ShareGPT's first-turn prompt and answer lengths
    under the real Qwen2.5 tokenizer (the dump at `path`, else the packaged one, shuffled with
    seed 0 as the bench client does), random token ids of those lengths."""
    from kvtier import SamplingParams
    from kvtier.bench.sharegpt import (
        load_sharegpt_records,
        sample_sharegpt,
        shuffled_conversations,
    )
    from kvtier.bench.tokenizer import resolve_tokenizer
    tokenizer = resolve_tokenizer("Qwen/Qwen2.5-1.5B-Instruct", None)
    records = shuffled_conversations(load_sharegpt_records(path), seed=0)
    return [([rng.randrange(1000, 30_000) for _ in range(s.prompt_len)],
             SamplingParams(max_tokens=s.expected_output_len, temperature=0.0,
                            ignore_eos=True))
            for s in sample_sharegpt(tokenizer, records, num_prompts)]


def p_replay(report: dict, num_prompts: int, tiers: tuple[str, ...], model: str | None = MODEL,
             prefix_len: int = 4096, output_len: int = 128,
             sharegpt: str | None = None, label: str = "",
             configure: Callable[[Any], None] | None = None) -> None:
    """Workload P in-process: 64 prefixes x 4,096 + 256, output 128, concurrency 64; or with
    `sharegpt` (a dump's path, "" for the packaged one) workload S: num_prompts ShareGPT-shaped
    requests, all at once. `configure(engine)` runs before the first request (A/B switches);
    `label` names the run in the report."""
    from kvtier import LLM, SamplingParams
    extra = {"kv_tiers": tiers} if tiers else {}
    llm = LLM(model, num_gpu_blocks_override=4096, max_num_batched_tokens=8192,
              max_num_seqs=256, scheduling_policy="lpm", **extra)
    engine = llm.engine
    if configure is not None:
        configure(engine)
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "launch", "runner_launch")
    timer.wrap(engine, "complete_step", "complete (waits for tokens)")
    timer.wrap(engine.scheduler, "update_from_output", "update")
    timer.wrap(engine.outputs, "detokenize", "detokenize")
    timer.wrap(engine, "make_outputs", "make_outputs")
    timer.wrap(engine.scheduler, "_admit_waiting", "schedule: admit waiting")
    if engine.tiers is not None:  # the tier's share of the host work
        timer.wrap(engine.tiers, "poll", "tier: poll")
        timer.wrap(engine.tiers, "store_lookahead", "tier: store lookahead (both calls)")
        timer.wrap(engine.scheduler, "store_ahead", "tier: store ahead (after launch)")
        timer.wrap(engine.scheduler, "_try_tier_load", "tier: lookup and start load")
        timer.wrap(engine.tiers, "on_evict", "tier: on_evict (stores at eviction)")
        timer.wrap(engine.tiers, "on_request_freed", "tier: on_request_freed")
        timer.wrap(engine.tiers, "_store_chunks", "tier: _store_chunks (all stores)")
    rng = random.Random(0)
    if sharegpt is not None:
        queued = sharegpt_shaped(num_prompts, rng, sharegpt or None)
        concurrency = num_prompts
    else:
        prefixes = [[rng.randrange(1000, 30_000) for _ in range(prefix_len)]
                    for _ in range(64)]
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        queued = [(prefixes[rng.randrange(64)]
                   + [rng.randrange(1000, 30_000) for _ in range(256)], params)
                  for _ in range(num_prompts)]
        concurrency = 64
    last: list[Any] = [None]
    schedule = engine.scheduler.schedule

    def remember() -> Any:
        last[0] = schedule()
        return last[0]
    engine.scheduler.schedule = remember
    in_flight = done = 0
    step_s: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    while done < num_prompts:
        while in_flight < concurrency and queued:
            engine.add_request(*queued.pop())
            in_flight += 1
        step_started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - step_started
        requests = last[0].requests
        kind = ("idle" if not requests else "decode" if all(
            len(s.token_ids) == 1 for s in requests) else "prefill")
        steps[kind] += 1
        step_s[kind] += elapsed
        finished = sum(o.finished for o in outputs)
        done += finished
        in_flight -= finished
    wall = time.perf_counter() - started
    if engine.tiers is not None:
        engine.shutdown()
    key = ("s" if sharegpt is not None else "p") + "_inprocess" + (
        "_" + "_".join(tiers) if tiers else "") + (f"_{label}" if label else "")
    report[key] = {
        "num_prompts": num_prompts, "wall_s": wall, "req_s": num_prompts / wall,
        "steps": dict(steps),
        "step_ms_mean": {k: 1e3 * step_s[k] / steps[k] for k in steps},
        "phase_s": {k: round(v, 3) for k, v in timer.totals.items()},
        "phase_calls": dict(timer.calls),
        "prefix_hit_tokens": engine.stats.num_prefix_cache_hit_tokens,
        "prompt_tokens": engine.stats.num_prompt_tokens,
        "preemptions": engine.stats.num_preemptions,
        "tier_stats": (None if engine.tiers is None else {
            k: v for k, v in vars(engine.tiers.stats).items() if isinstance(v, int | float)}),
    }
    print(key, json.dumps(report[key]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--num-prompts", type=int, default=640)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--no-replay", action="store_true",
                        help="kernel tables only: skip the in-process replays of P")
    parser.add_argument("--tier", action="append", default=[],
                        help="also replay P with this tier stack (e.g. cpu:16GiB); repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the in-process replay: embedded model, tiny P")
    args = parser.parse_args()
    if args.smoke:
        report_smoke: dict = {}
        p_replay(report_smoke, 6, (), model=None, prefix_len=32, output_len=4)
        p_replay(report_smoke, 6, ("cpu:1GiB",), model=None, prefix_len=32, output_len=4)
        return
    report: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()}
    print("card:", report["card"], flush=True)
    report["device_copy_gbs_rw"] = gbs = copy_gbs()
    if not args.skip_kernels:
        decode_section(report, gbs)
        torch.cuda.empty_cache()
    if args.no_replay:
        Path(args.out).write_text(json.dumps(report, indent=1))
        return
    p_replay(report, args.num_prompts, ())
    torch.cuda.empty_cache()
    for tier in args.tier:
        p_replay(report, args.num_prompts, (tier,))
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
