"""Scattering a staged tier load into the paged KV cache: device and host time per group of
four whole chunks (issue 6; `KVTransfer._scatter`).

A cpu-tier load stages its chunks back to back on the device and writes them into their
blocks group by group. Three ways to write one group (Qwen2.5-1.5B's KV: 28 layers, 2 KV heads,
128 dims, bf16; 16-block chunks of 16 tokens):
- per_chunk: one `index_copy_` per chunk (a strided view of its staged entry);
- index_put: one indexed write through a (chunks, blocks) index of the permuted group;
- reshape_copy: the group made contiguous in the cache's layout, then one `index_copy_`.

    PYTHONPATH=src python3 scripts/bench_load_scatter.py

NVIDIA H200, 2026-11-29 (per group of 4 chunks, 29 MB): per_chunk 63 us device / 47 us host,
index_put 77 / 14, reshape_copy 91 / 23. The scatters of one group overlap the next group's
host-to-device copies (~0.5 ms), so host time decides: `_scatter` takes index_put.
"""

from __future__ import annotations

import json
import time

import torch

LAYERS, HEADS, DIM, BLOCK, CHUNK_BLOCKS, GROUP, NUM_BLOCKS = 28, 2, 128, 16, 16, 4, 4096


def main() -> None:
    device = torch.device("cuda")
    cache = torch.zeros(LAYERS, 2, NUM_BLOCKS, BLOCK, HEADS, DIM, dtype=torch.bfloat16,
                        device=device)
    entry = (LAYERS, 2, CHUNK_BLOCKS, BLOCK, HEADS, DIM)
    staged = torch.randn(GROUP, *entry, device=device).to(torch.bfloat16)
    index = torch.randperm(NUM_BLOCKS, device=device)[:GROUP * CHUNK_BLOCKS]

    def per_chunk() -> None:
        for i in range(GROUP):
            cache.index_copy_(2, index[i * CHUNK_BLOCKS:(i + 1) * CHUNK_BLOCKS], staged[i])

    def index_put() -> None:
        cache[:, :, index.view(GROUP, CHUNK_BLOCKS)] = staged.movedim(0, 2)

    def reshape_copy() -> None:
        source = staged.movedim(0, 2).reshape(LAYERS, 2, GROUP * CHUNK_BLOCKS, BLOCK, HEADS, DIM)
        cache.index_copy_(2, index, source)

    expected = None
    report: dict = {"card": torch.cuda.get_device_name(), "group_mb": staged.numel() * 2 / 1e6}
    for name, fn in (("per_chunk", per_chunk), ("index_put", index_put),
                     ("reshape_copy", reshape_copy)):
        cache.zero_()
        fn()
        torch.cuda.synchronize()
        if expected is None:
            expected = cache.clone()
        assert torch.equal(cache, expected), name
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        for _ in range(50):
            fn()
        end.record()
        host = (time.perf_counter() - host) / 50
        end.synchronize()
        report[name] = {"device_us": round(1e3 * start.elapsed_time(end) / 50, 1),
                        "host_us": round(1e6 * host, 1)}
        print(name, report[name], flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
