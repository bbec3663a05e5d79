"""Async scheduling on the GPU: one engine, the synchronous and the async pipeline in turn.

Offline decode throughput of the Qwen2.5-1.5B shape (random weights, bf16) at several batch
sizes, each pipeline in interleaved rounds on the same engine (the same graphs, the same KV
pool), and whether both give the same greedy tokens. The async pipeline is `LLM._run`'s:
launch step N+1, then read step N's tokens.

    PYTHONPATH=src python3 scripts/async_scheduling_gpu.py [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from kvtier import LLM, SamplingParams
from kvtier.engine.engine import LLMEngine


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
        async_scheduling: bool) -> tuple[float, list[list[int]], int]:
    """Wall seconds, the tokens of each prompt, and the steps taken."""
    ids = [engine.add_request(p, params) for p in prompts]
    pending, tokens = set(ids), {}
    steps = 0
    torch.cuda.synchronize()
    started = time.perf_counter()

    def collect(outputs: list) -> None:  # type: ignore[type-arg]
        for output in outputs:
            if output.finished and output.request_id in pending:
                tokens[output.request_id] = output.outputs[0].token_ids
                pending.discard(output.request_id)

    in_flight = None
    while pending:
        steps += 1
        if not async_scheduling:
            collect(engine.step())
            continue
        launched = engine.launch_step()
        if in_flight is not None:
            collect(engine.make_outputs(engine.complete_step(in_flight)))
        in_flight = launched
    if in_flight is not None:
        engine.complete_step(in_flight)
    wall = time.perf_counter() - started
    return wall, [tokens[i] for i in ids], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print("card:", torch.cuda.get_device_name(), flush=True)
    llm = LLM("random:qwen2.5-1.5b", dtype="bfloat16", num_gpu_blocks_override=16384,
              max_num_batched_tokens=8192)
    engine = llm.engine
    rng = random.Random(0)
    cases = [(1, 512, 128), (16, 512, 128), (32, 512, 128), (64, 512, 128), (256, 256, 64)]
    results = []
    for batch, prompt_len, output_len in cases:
        prompts = [[rng.randrange(1000, 100_000) for _ in range(prompt_len)]
                   for _ in range(batch)]
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        run(engine, prompts, params, False)  # warm-up (and the prefix cache for both)
        walls: dict[bool, list[float]] = {False: [], True: []}
        outputs: dict[bool, list[list[int]]] = {}
        for _ in range(args.rounds):
            for mode in (False, True):
                wall, tokens, _ = run(engine, prompts, params, mode)
                walls[mode].append(wall)
                outputs[mode] = tokens
        sync_s, async_s = statistics.median(walls[False]), statistics.median(walls[True])
        row = {
            "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
            "sync_tok_s": batch * output_len / sync_s, "async_tok_s": batch * output_len / async_s,
            "sync_ms_per_step": 1000 * sync_s / output_len,
            "async_ms_per_step": 1000 * async_s / output_len,
            "speedup": sync_s / async_s,
            "same_tokens": outputs[False] == outputs[True],
            "walls": {"sync": walls[False], "async": walls[True]},
        }
        results.append(row)
        print(f"batch {batch:>3} ({prompt_len}+{output_len}): sync {row['sync_tok_s']:9.0f} "
              f"tok/s ({row['sync_ms_per_step']:.3f} ms/token), async "
              f"{row['async_tok_s']:9.0f} tok/s ({row['async_ms_per_step']:.3f} ms/token), "
              f"x{row['speedup']:.3f}, same tokens: {row['same_tokens']}", flush=True)
    pool = engine.pool
    print("blocks free at the end:", pool.num_free_blocks, "of", pool.num_blocks)
    del llm, engine
    torch.cuda.empty_cache()
    tier = tier_case(rng)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "cases": results, "tier": tier},
                      f, indent=1)


def tier_case(rng: random.Random) -> dict[str, object]:
    """A cpu tier under KV pressure: 12 prefixes of 2,048 tokens for a 1,024-block (16,384
    tokens) pool, 48 requests at once, each pipeline twice. Tier loads finish when the copy
    engine is done, so batches differ from run to run even with one pipeline; bf16 greedy
    tokens of random weights (near-flat logits) then differ too. Reported: how many requests
    differ between runs, within a pipeline and across, and the tier hits."""
    llm = LLM("random:qwen2.5-1.5b", dtype="bfloat16", num_gpu_blocks_override=1024,
              max_num_batched_tokens=8192, kv_tiers=["cpu:8GiB"])
    engine = llm.engine
    prefixes = [[rng.randrange(1000, 100_000) for _ in range(2048)] for _ in range(12)]
    prompts = [prefixes[i % 12] + [rng.randrange(1000, 100_000) for _ in range(64)]
               for i in range(48)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    run(engine, prompts, params, False)  # fills the tier
    outputs: dict[str, list[list[int]]] = {}
    hits: dict[str, int] = {}
    for name, mode in (("sync", False), ("async", True), ("sync again", False),
                       ("async again", True)):
        before = sum(engine.tiers.stats.hit_tokens.values())
        wall, outputs[name], _ = run(engine, prompts, params, mode)
        hits[name] = sum(engine.tiers.stats.hit_tokens.values()) - before
        print(f"cpu tier, {name}: {wall:.3f} s, {hits[name]} tier-hit tokens", flush=True)

    def differing(a: str, b: str) -> int:
        return sum(x != y for x, y in zip(outputs[a], outputs[b], strict=True))

    pairs = {f"{a} / {b}": differing(a, b) for a, b in (
        ("sync", "sync again"), ("async", "async again"), ("sync", "async"),
        ("sync again", "async again"))}
    pool = engine.pool
    print(f"cpu tier: requests (of 48) whose tokens differ: {pairs}; blocks free at the end: "
          f"{pool.num_free_blocks} of {pool.num_blocks}", flush=True)
    return {"differing_requests": pairs, "tier_hit_tokens": hits}


if __name__ == "__main__":
    main()
