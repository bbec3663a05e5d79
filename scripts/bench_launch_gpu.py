"""Host time of the attention backend's eager launches: Triton's `JITFunction.run` against
`CachedKernel` (issue 6; kvtier/triton_launch.py).

A prefill step outside the decode graphs runs attention eagerly in each layer; Q's tier hits
spend most of such a step's host time launching it. Two measurements per path, host time only
(the GPU is kept busy-free: every figure is a mean over many launches, synchronised once):
- one `kv_write_kernel` launch of 256 tokens;
- one layer's `TritonAttentionBackend.forward` for a Q tier hit's step: a 256-token extend
  after a 4,096-token cached prefix and three decodes of ~4,200 tokens (Qwen2.5-1.5B's
  attention: 12 query heads, 2 KV heads, 128 dims, bf16, 16-token blocks).
Both paths run in one process (`CachedKernel.enabled` toggled), interleaved over rounds.

    PYTHONPATH=src python3 scripts/bench_launch_gpu.py [--out launch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvtier.attention import triton_backend
from kvtier.attention.base import AttentionMetadata
from kvtier.attention.triton_backend import TritonAttentionBackend, write_kv

HEADS, KV_HEADS, DIM, BLOCK = 12, 2, 128, 16
CACHED = (triton_backend.kv_write_kernel, triton_backend.prefill_kernel,
          triton_backend.decode_partial_kernel, triton_backend.decode_reduce_kernel)


def set_cached(on: bool) -> None:
    for kernel in CACHED:
        kernel.enabled = on


def hit_step(device: torch.device) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Three decodes then one 256-token extend after 4,096 cached tokens, paged at random."""
    contexts = [4_200, 4_230, 4_260]
    query_lens = [1, 1, 1, 256]
    seq_lens = contexts + [4_096 + 256]
    blocks_per_seq = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 8
    perm = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq)
    table, slots, start = [], [], 0
    for seq_len, query_len, count in zip(seq_lens, query_lens, blocks_per_seq, strict=True):
        blocks = perm[start:start + count]
        start += count
        table.append(blocks + [0] * (width - count))
        for pos in range(seq_len - query_len, seq_len):
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        num_tokens=starts[-1], num_seqs=4, num_decodes=3,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=torch.tensor(table, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_size=BLOCK)
    kv_cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, DIM, device=device,
                           dtype=torch.bfloat16)
    qkv = torch.randn(starts[-1], (HEADS + 2 * KV_HEADS) * DIM, device=device,
                      dtype=torch.bfloat16)
    return metadata, kv_cache, qkv


def host_us(fn, launches: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(launches):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / launches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="launch.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--launches", type=int, default=200,
                        help="per timing: few enough that the launch queue never fills")
    args = parser.parse_args()
    device = torch.device("cuda")
    metadata, kv_cache, qkv = hit_step(device)
    q, k, v = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    q, k, v = q.view(-1, HEADS, DIM), k.view(-1, KV_HEADS, DIM), v.view(-1, KV_HEADS, DIM)
    backend = TritonAttentionBackend()

    def layer() -> torch.Tensor:
        return backend.forward(q, k, v, kv_cache, metadata, DIM ** -0.5)

    def kv_write() -> None:
        write_kv(k[-256:], v[-256:], kv_cache, metadata.slot_mapping[-256:], BLOCK)

    backend.prepare(metadata)
    results: dict[str, dict[str, list[float]]] = {"kv_write": {}, "layer": {}}
    outputs = {}
    for on in (False, True):  # compile and warm both paths, and check they agree
        set_cached(on)
        for _ in range(3):
            out = layer()
        torch.cuda.synchronize()
        outputs[on] = out.clone()
    for _ in range(args.rounds):
        for on in (False, True):
            set_cached(on)
            name = "cached" if on else "jit"
            results["kv_write"].setdefault(name, []).append(host_us(kv_write, args.launches))
            results["layer"].setdefault(name, []).append(host_us(layer, args.launches))
    report = {
        "card": torch.cuda.get_device_name(),
        "outputs_identical": bool(torch.equal(outputs[False], outputs[True])),
        "median_host_us": {what: {name: round(statistics.median(v), 2)
                                  for name, v in by.items()} for what, by in results.items()},
        "rounds": results,
    }
    print(json.dumps({k: report[k] for k in ("card", "outputs_identical", "median_host_us")}))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
