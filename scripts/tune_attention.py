"""Tile configs of the Triton attention kernels, timed on one layer of the Qwen2.5-1.5B shape.

Issue 6's prefill target (8,192 tokens within 1.4x the FLOP floor) spends about a third of its
time in the causal prefill kernel, and P's decode steps about a quarter in decode attention.
This times `TritonAttentionBackend.forward` (KV write included, replayed as a CUDA graph) for
each candidate config on the shapes the seed workloads run, checks each against the backend's
own choice (the first row), and prints time and rate.

    PYTHONPATH=src python3 scripts/tune_attention.py --out $OUT/tune.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.triton_backend import (
    DecodeConfig,
    PrefillConfig,
    TritonAttentionBackend,
    default_decode_config,
    default_prefill_config,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 2, 128, 16
PREFILL_CONFIGS = [None, PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 3),
                   PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 4, 3),
                   PrefillConfig(64, 64, 4, 3)]
"""None: the backend's own choice (the first row, and the reference of the others)."""
PROMPT_CONFIGS = [None, PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 2),
                  PrefillConfig(128, 64, 4, 3), PrefillConfig(128, 64, 8, 4),
                  PrefillConfig(64, 64, 4, 3)]
DECODE_CONFIGS = [None, DecodeConfig(64, 4, 3), DecodeConfig(128, 4, 3), DecodeConfig(64, 8, 3),
                  DecodeConfig(32, 4, 4), DecodeConfig(128, 8, 2), DecodeConfig(64, 4, 4),
                  DecodeConfig(32, 2, 4)]


def make_step(new_tokens: list[int], cached: list[int], num_decodes: int, num_blocks: int,
              device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata of one step: the first num_decodes sequences decode one token, the others
    prefill new_tokens[i] after cached[i]; pages are a random permutation of the pool."""
    seq_lens = [c + n for c, n in zip(cached, new_tokens, strict=True)]
    width = max(-(-s // BLOCK_SIZE) for s in seq_lens)
    pages = list(range(num_blocks))
    random.Random(0).shuffle(pages)
    table = [[pages.pop() for _ in range(width)] for _ in seq_lens]
    starts = [0]
    for n in new_tokens:
        starts.append(starts[-1] + n)
    slots = [table[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for i, (c, s) in enumerate(zip(cached, seq_lens, strict=True)) for p in range(c, s)]
    metadata = AttentionMetadata(
        num_tokens=starts[-1], num_seqs=len(seq_lens), num_decodes=num_decodes,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=torch.tensor(table, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens, max_query_len=max(new_tokens),
        max_seq_len=max(seq_lens), block_size=BLOCK_SIZE)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device,
                           dtype=torch.bfloat16)
    return metadata, kv_cache


def attention_flops(new_tokens: list[int], cached: list[int]) -> float:
    """Causal attention FLOPs (QK^T and PV) of the step's query tokens."""
    visible = sum(n * c + n * (n + 1) / 2 for n, c in zip(new_tokens, cached, strict=True))
    return 4 * visible * HEAD_DIM * NUM_HEADS


def sweep(name: str, new_tokens: list[int], cached: list[int], num_decodes: int,
          configs: list, make_backend, report: dict) -> None:  # noqa: ANN001
    device = torch.device("cuda")
    # Every table row is as wide as the longest sequence's, each from distinct pages.
    num_blocks = len(new_tokens) * max(-(-(c + n) // BLOCK_SIZE)
                                       for c, n in zip(cached, new_tokens, strict=True))
    metadata, kv_cache = make_step(new_tokens, cached, num_decodes, num_blocks + 8, device)
    total = sum(new_tokens)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = attention_flops(new_tokens, cached)
    kv_bytes = sum(c + n for c, n in zip(cached, new_tokens, strict=True)) * (
        2 * NUM_KV_HEADS * HEAD_DIM * 2)
    reference = None
    rows = []
    for config in configs:
        backend = make_backend(config)
        backend.prepare(metadata)

        def run(backend=backend) -> torch.Tensor:  # noqa: ANN001
            return backend.forward(q, k, v, kv_cache, metadata, HEAD_DIM ** -0.5)
        try:
            out = run()
            torch.cuda.synchronize()
            # Timed as a CUDA graph: eager launches of these short kernels are bound by the
            # host's Python, which would hide the differences between tiles.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
        except Exception as exc:  # a config that does not fit (shared memory) is skipped
            rows.append({"config": str(config), "error": str(exc)[:120]})
            print(f"{name} {config}: {str(exc)[:120]}", flush=True)
            continue
        graph.replay()
        torch.cuda.synchronize()
        if reference is None:
            reference = out.float().clone()
        error = (out.float() - reference).abs().max().item()
        ms = cuda_time(graph.replay, repeat=20) * 1e3
        row = {"config": str(config), "ms": round(ms, 4), "max_diff_vs_first": error,
               "tflops": round(flops / ms / 1e9, 1), "kv_gbs": round(kv_bytes / ms / 1e6, 1)}
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    report[name] = rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tune.json")
    parser.add_argument("--only-prefill", action="store_true", help="skip the decode sweeps")
    args = parser.parse_args()
    report: dict = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "default_prefill": str(default_prefill_config(HEAD_DIM)),
                    "default_decode": str(default_decode_config(HEAD_DIM))}
    print("card:", report["card"], flush=True)

    def prefill_backend(config: PrefillConfig) -> TritonAttentionBackend:
        return TritonAttentionBackend(prefill_config=config)

    def decode_backend(config: DecodeConfig) -> TritonAttentionBackend:
        return TritonAttentionBackend(decode_config=config)
    def paged_prompt_backend(config: PrefillConfig) -> TritonAttentionBackend:
        return TritonAttentionBackend(prefill_config=config, own_kv_prompts=False)
    # Whole prompts read K/V from the step's own key/value rows (prompt_kernel); the paged
    # rows are the same prompts gathered from the cache (prefill_kernel), for comparison.
    sweep("prefill_8192", [8192], [0], 0, PROMPT_CONFIGS, prefill_backend, report)
    sweep("prefill_8192_paged", [8192], [0], 0, PREFILL_CONFIGS, paged_prompt_backend, report)
    sweep("prefill_4352", [4352], [0], 0, PROMPT_CONFIGS, prefill_backend, report)
    sweep("prefill_4352_paged", [4352], [0], 0, PREFILL_CONFIGS[:3], paged_prompt_backend,
          report)
    sweep("prefill_2x4352", [4352, 3840], [0, 0], 0, PROMPT_CONFIGS[:3], prefill_backend,
          report)
    sweep("extend_256_after_4096", [256], [4096], 0, PREFILL_CONFIGS, prefill_backend, report)
    sweep("extend_4x256_after_4096", [256] * 4, [4096] * 4, 0, PREFILL_CONFIGS,
          prefill_backend, report)
    if args.only_prefill:
        Path(args.out).write_text(json.dumps(report, indent=1))
        return
    for batch in (1, 16, 32):
        sweep(f"decode_b{batch}_4352", [1] * batch, [4351] * batch, batch, DECODE_CONFIGS,
              decode_backend, report)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
