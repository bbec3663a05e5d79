"""Greedy tokens on the card under the default async scheduling against the synchronous core,
with and without the cpu tier (issue 6: "greedy output is token-identical with tiers on and
off"; async scheduling became the CUDA default in 4e70ddc).

On an H200 (twenty-fifth session) async scheduling gave the synchronous tokens exactly, and the
cpu tier changed tokens at positions 2-17 of some requests, the same ones under both cores.
`gpu_check.py`'s protocol (one request at a time on a fresh engine) gives identical tokens;
this one first runs all twelve at once. Whether the cause is the GEMMs' batch variance (a
loaded prefix holds the bits of its first computation, a recomputed one those of another
step shape) is what "batched equals one by one" below is for.

The KV witness settles it at the source. On four fresh prefixes (each computed alone first,
then the twelve requests at once, then one by one) it reads back every block the pool
registers and compares it bit for bit with the block's earlier versions. A block loaded from
the tier must equal a version computed before; a recomputed one may differ from its first
computation where the step shape changed the GEMMs' reduction order.

The Qwen2.5-1.5B shape with random weights, a 384-block pool under four 2,048-token prefixes
(evicted between uses, so the tier serves them), twelve requests of 24 tokens, all at once.

    PYTHONPATH=src:scripts python3 scripts/greedy_async_check_gpu.py --out $OUT/greedy.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile

import torch

MODEL = "random:qwen2.5-1.5b"


def main() -> None:
    from kvtier import LLM, SamplingParams
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="greedy_async.json")
    parser.add_argument("--model", default=MODEL, help="CPU smoke check: random:tiny-llama")
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--configs", default="sync-off,default-off,default-cpu",
                        help="comma-separated, the first is the reference; also sync-cpu, "
                             "default-cpu-next-step (tier loads a step later) and "
                             "default-cpu-disk (most loads from a disk tier)")
    args = parser.parse_args()
    rng = random.Random(9)
    vocab = 100_000 if args.model == MODEL else 40_000
    prefixes = [[rng.randrange(1000, vocab) for _ in range(args.prefix_len)]
                for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(1000, vocab) for _ in range(64)]
               for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    report: dict = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    tokens = {}
    disk_dir = tempfile.mkdtemp(prefix="kvtier-greedy-disk-")
    configs = {"sync-off": {"async_scheduling": False}, "default-off": {},
               "default-cpu": {"kv_tiers": ("cpu:4GiB",)},
               "sync-cpu": {"kv_tiers": ("cpu:4GiB",), "async_scheduling": False},
               "default-cpu-next-step": {"kv_tiers": ("cpu:4GiB",),
                                         "kv_load_timing": "next-step"},
               # A cpu tier of about one prefix over a disk tier: most loads from the disk.
               "default-cpu-disk": {"kv_tiers": ("cpu:64MiB", f"disk:{disk_dir}:8GiB")}}
    for name in args.configs.split(","):
        if name not in configs:
            parser.error(f"--configs: unknown configuration {name!r}; known: "
                         f"{', '.join(configs)}")
        extra = configs[name]
        llm = LLM(args.model, dtype=args.dtype, num_gpu_blocks_override=384,
                  max_num_batched_tokens=2048, max_num_seqs=16, **extra)
        report[f"{name}: async"] = llm.engine.async_scheduling
        # Twice: all at once (the scheduler mixes them), then one by one (prefix hits).
        tokens[name] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params)],
                        [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts])
        report[f"{name}: kv witness"] = kv_witness(llm, params, vocab, args.prefix_len)
        if llm.engine.tiers is not None:
            report[f"{name}: tier hit tokens"] = dict(llm.engine.tiers.stats.hit_tokens)
            llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    # The same prompts batched (pass 0) and one by one (pass 1) within one configuration: a
    # difference there is the kernels' batch variance, not a cache feature.
    report["batched equals one by one"] = {name: got[0] == got[1] for name, got in tokens.items()}
    reference = tokens[next(iter(tokens))]
    report["identical"] = {name: got == reference for name, got in tokens.items()}
    # Where a configuration differs: (pass, prompt, first differing position).
    report["first differences"] = {
        name: [(run, i, next(j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b))
               for run in range(2) for i, (x, y) in enumerate(zip(got[run], reference[run],
                                                                  strict=True)) if x != y]
        for name, got in tokens.items() if got != reference}
    print(json.dumps(report, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def kv_witness(llm, params, vocab: int, prefix_len: int) -> dict[str, int]:  # noqa: ANN001
    """Each block the pool registers, read back at registration (its KV is final then: the
    step that computed it, or the load that wrote it, is done once the device is synchronised)
    and compared bit for bit with the block's earlier versions (module docstring)."""
    engine = llm.engine
    pool, kv_cache = engine.pool, engine.runner.kv_cache
    register = pool.cache_block
    versions: dict = {}  # hash -> digests of each time its KV was computed, first first
    loading: set = set()
    counts = {"computed first": 0, "recomputed equal": 0, "recomputed differ": 0,
              "loaded equal to a computed version": 0, "loaded matching none": 0}

    def witnessing_cache_block(block_id: int, block_hash) -> bool:  # noqa: ANN001
        newly = pool.blocks[block_id].block_hash is None and block_hash not in pool._hash_to_block
        cached = register(block_id, block_hash)
        if not (cached and newly):
            return cached
        if kv_cache.is_cuda:
            torch.cuda.synchronize()
        bits = kv_cache[:, :, block_id].contiguous().view(-1).view(torch.uint8).cpu()
        digest = hashlib.sha1(bits.numpy().tobytes()).hexdigest()
        seen = versions.setdefault(block_hash, [])
        if block_hash in loading:
            loading.discard(block_hash)
            counts["loaded equal to a computed version" if digest in seen
                   else "loaded matching none"] += 1
            return cached
        if not seen:
            counts["computed first"] += 1
        else:
            counts["recomputed equal" if digest == seen[0] else "recomputed differ"] += 1
        seen.append(digest)
        return cached

    if engine.tiers is not None:
        start_load = engine.tiers.start_load

        def recording_start_load(request_id, plan, block_ids, block_hashes):  # noqa: ANN001
            loading.update(block_hashes[:plan.num_blocks])
            return start_load(request_id, plan, block_ids, block_hashes)
        engine.tiers.start_load = recording_start_load
    pool.cache_block = witnessing_cache_block
    rng = random.Random(17)
    prefixes = [[rng.randrange(1000, vocab) for _ in range(prefix_len)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(1000, vocab) for _ in range(64)]
               for i in range(12)]
    try:
        for prompt in prompts[:4]:  # each prefix's first computation, alone
            llm.generate([prompt], params)
        llm.generate(prompts, params)
        for prompt in prompts:
            llm.generate([prompt], params)
    finally:
        pool.cache_block = register
        if engine.tiers is not None:
            engine.tiers.start_load = start_load
    return counts

if __name__ == "__main__":
    main()
