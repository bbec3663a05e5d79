"""Decode attention at small batches, the way a decode graph runs it: 28 layers' attention
calls (each its own paged cache, Qwen2.5-1.5B's 12 query / 2 KV heads, d=128, bf16, block 16)
captured in one CUDA graph, with programmatic dependent launch where the backend uses it.

Variants: `decode_partial_kernel` with and without its L2 prefetch of the first K/V tile
before the PDL wait (`triton_backend.PREFETCH_DECODE_TILE`). Each is checked against the
torch reference, and its graph is replayed 20 more times to check that the outputs are
bitwise repeatable.

    PYTHONPATH=src:scripts python3 scripts/bench_decode_attention.py \
        --out $OUT/decode_attention.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
import triton
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script

from kvtier.attention import triton_backend
from kvtier.attention.base import AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.attention.triton_backend import TritonAttentionBackend, choose_num_splits

LAYERS = 28
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 2, 128, 16
DTYPE = torch.bfloat16
GRAPH_HORIZON = 4096
"""The context the engine's decode graphs size their split count for (`SPLIT_HORIZON_TOKENS`)."""
VARIANTS = {"prefetch": True, "no prefetch": False}
"""Whether decode_partial_kernel prefetches its first K/V tile before its PDL wait."""


def make_layers(batch: int, context: int, device: torch.device, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = triton.cdiv(context, BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    caches = [torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen)
              .to(DTYPE).to(device) for _ in range(LAYERS)]
    table = (torch.randperm(num_blocks - 1, generator=gen)[:batch * blocks_per_seq] + 1)
    table = table.view(batch, blocks_per_seq).to(torch.int32).to(device)
    last = context - 1
    slots = (table[:, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE)
    qkv = [torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen).to(DTYPE)
           .to(device) for _ in range(LAYERS)]
    metadata = AttentionMetadata(
        num_tokens=batch, num_seqs=batch, num_decodes=batch,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_table=table, slot_mapping=slots,
        query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[GRAPH_HORIZON] * batch,
        max_query_len=1, max_seq_len=GRAPH_HORIZON, block_size=BLOCK_SIZE)
    return {"caches": caches, "qkv": qkv, "metadata": metadata}


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    return (q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM),
            v.view(-1, KV_HEADS, HEAD_DIM))


def run_variant(layers: dict, prefetch: bool, reference: list[torch.Tensor]) -> dict:
    triton_backend.PREFETCH_DECODE_TILE = prefetch
    backend = TritonAttentionBackend()
    metadata = layers["metadata"]
    backend.prepare(metadata)
    outs = [torch.empty(metadata.num_tokens, HEADS, HEAD_DIM, dtype=DTYPE,
                        device=metadata.block_table.device) for _ in range(LAYERS)]
    scale = HEAD_DIM ** -0.5

    def forward() -> None:
        for qkv, cache, out in zip(layers["qkv"], layers["caches"], outs, strict=True):
            backend.forward(*split_qkv(qkv), cache, metadata, scale, out=out)

    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    graph.replay()
    first = [o.clone() for o in outs]
    repeatable = True
    for _ in range(20):
        graph.replay()
        repeatable &= all(torch.equal(a, b) for a, b in zip(first, outs, strict=True))
    error = max((o.float() - r).abs().max().item() for o, r in zip(first, reference,
                                                                   strict=True))
    times = [cuda_time(graph.replay, repeat=20) for _ in range(5)]
    return {"us_per_layer": statistics.median(times) / LAYERS * 1e6,
            "max_abs_error": error, "repeatable": repeatable,
            "splits": choose_num_splits(metadata.num_decodes, KV_HEADS,
                                        GRAPH_HORIZON, backend.num_sms or 132)}


def reference_outputs(layers: dict) -> list[torch.Tensor]:
    backend = TorchAttentionBackend()
    metadata = dataclasses.replace(layers["metadata"])
    context = int(metadata.seq_lens[0])
    metadata.seq_lens_cpu = [context] * metadata.num_decodes
    metadata.max_seq_len = context
    backend.prepare(metadata)
    outs = []
    for qkv, cache in zip(layers["qkv"], layers["caches"], strict=True):
        q, k, v = (t.float() for t in split_qkv(qkv))
        outs.append(backend.forward(q, k, v, cache.float(), metadata, HEAD_DIM ** -0.5))
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="decode_attention.json")
    parser.add_argument("--cases", default="1x512,1x2048,1x8192,2x512,4x2048,32x2048",
                        help="batch x context, comma-separated")
    args = parser.parse_args()
    device = torch.device("cuda")
    print("card:", torch.cuda.get_device_name(device), flush=True)
    report: dict = {"card": torch.cuda.get_device_name(device), "layers": LAYERS, "cases": {}}
    for case in args.cases.split(","):
        batch, context = (int(x) for x in case.split("x"))
        layers = make_layers(batch, context, device, seed=batch * 100_003 + context)
        reference = reference_outputs(layers)
        results = {}
        for name, variant in VARIANTS.items():
            results[name] = run_variant(layers, variant, reference)
            r = results[name]
            print(f"b{batch} ctx {context:5} {name:12} {r['us_per_layer']:6.2f} us/layer "
                  f"err {r['max_abs_error']:.4f} repeatable {r['repeatable']} "
                  f"splits {r['splits']}", flush=True)
        report["cases"][case] = results
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
