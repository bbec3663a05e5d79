"""The memory plan leaves room for sampling a full decode batch (issue 6), on the GPU.

With the KV pool sized from --gpu-memory-utilization, the engine keeps aside what its largest
step needs, sampling included (`runner.memory`). This fills the pool's plan on the
Qwen2.5-1.5B shape and runs max_num_seqs requests at once on the sampler's costliest path
(logprobs 20, a repetition penalty, min-p, top-p without top-k, half seeded): it must finish
without running out of memory.

    PYTHONPATH=src python3 scripts/check_sampling_memory_gpu.py
"""

from __future__ import annotations

import random

import torch

from kvtier import LLM, SamplingParams


def main() -> None:
    print("card:", torch.cuda.get_device_name(), flush=True)
    batch = 256
    llm = LLM("random:qwen2.5-1.5b", gpu_memory_utilization=0.9, max_num_seqs=batch)
    pool = llm.engine.pool
    print(f"KV blocks {pool.num_blocks}; free after start "
          f"{torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB of "
          f"{torch.cuda.mem_get_info()[1] / 2**30:.1f}", flush=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(64)] for _ in range(batch)]
    params = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, min_p=0.01,
                             repetition_penalty=1.1, logprobs=20, ignore_eos=True,
                             seed=i if i % 2 else None) for i in range(batch)]
    torch.cuda.reset_peak_memory_stats()
    outputs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
    print(f"{batch} requests sampled on the costliest path: ok; peak allocated "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB of "
          f"{torch.cuda.mem_get_info()[1] / 2**30:.1f}", flush=True)


if __name__ == "__main__":
    main()
