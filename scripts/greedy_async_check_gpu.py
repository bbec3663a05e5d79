"""Greedy tokens on the card under the default async scheduling against the synchronous core,
with and without the cpu tier (issue 6: "greedy output is token-identical with tiers on and
off"; async scheduling became the CUDA default in 4e70ddc).

On an H200 (twenty-fifth session) async scheduling gave the synchronous tokens exactly, and the
cpu tier changed tokens at positions 2-17 of some requests, the same ones under both cores.
`gpu_check.py`'s protocol (one request at a time on a fresh engine) gives identical tokens;
this one first runs all twelve at once. Whether the cause is the GEMMs' batch variance (a
loaded prefix holds the bits of its first computation, a recomputed one those of another
step shape) is what "batched equals one by one" below is for.

The KV witness (`kvtier.utils.kv_witness`) settles it at the source. On four fresh prefixes
(each computed alone first, then the twelve requests at once, then one by one) it reads back
every block the pool registers and compares it bit for bit with the block's earlier versions.
A block loaded from the tier must equal a version computed before; a recomputed one may
differ from its first computation where the step shape changed the GEMMs' reduction order.

The Qwen2.5-1.5B shape with random weights, a 384-block pool under four 2,048-token prefixes
(evicted between uses, so the tier serves them), twelve requests of 24 tokens, all at once.

    PYTHONPATH=src:scripts python3 scripts/greedy_async_check_gpu.py --out $OUT/greedy.json

With `--batch-invariant` (twenty-eighth session, nvidia-h200) batched equals one by one,
every configuration gives the reference's tokens, and the witness finds no recomputed block
that differs from its first computation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import tempfile

import torch

from kvtier.utils.kv_witness import KVWitness

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
    parser.add_argument("--batch-invariant", action="store_true",
                        help="every configuration batch-invariant: batched must equal one by "
                             "one, and the witness's recomputed blocks their first versions")
    args = parser.parse_args()
    rng = random.Random(9)
    vocab = 100_000 if args.model == MODEL else 40_000
    prefixes = [[rng.randrange(1000, vocab) for _ in range(args.prefix_len)]
                for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(1000, vocab) for _ in range(64)]
               for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    report: dict = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "batch_invariant": args.batch_invariant}
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
                  max_num_batched_tokens=2048, max_num_seqs=16,
                  batch_invariant=args.batch_invariant, **extra)
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
    shutil.rmtree(disk_dir, ignore_errors=True)
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
    """`KVWitness` counts on four fresh prefixes: each computed alone first, then the twelve
    requests at once, then one by one."""
    rng = random.Random(17)
    prefixes = [[rng.randrange(1000, vocab) for _ in range(prefix_len)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(1000, vocab) for _ in range(64)]
               for i in range(12)]
    with KVWitness(llm.engine) as witness:
        for prompt in prompts[:4]:
            llm.generate([prompt], params)
        llm.generate(prompts, params)
        for prompt in prompts:
            llm.generate([prompt], params)
    return dataclasses.asdict(witness.counts)


if __name__ == "__main__":
    main()
