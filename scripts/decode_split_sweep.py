"""Decode attention at workload P's batch sizes: split counts and tiles, 28 layers in one graph.

P's steps are ~90% decode-only at batch 16-32 with ~4,400-token contexts, and decode attention
is the largest kernel of those steps (24 us a layer at batch 16: 2.95 TB/s against a ~4.1 TB/s
copy rate). Each program of `decode_partial_kernel` covers one split of one (sequence, KV
head); `choose_num_splits` picks the count (two programs per SM until ddb9089, then as many
as one resident wave of four per SM holds). This times the backend's decode forward (KV
write, partial and reduce kernels) of 28 layers, each with its own paged cache, captured in
one CUDA graph, for each split count and tile config, next to the copy-rate floor of the K/V
bytes measured in the same run.

    PYTHONPATH=src:scripts python3 scripts/decode_split_sweep.py --out $OUT/split_sweep.json
    TRITON_INTERPRET=1 PYTHONPATH=src:scripts python3 scripts/decode_split_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import triton
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.attention.triton_backend import DecodeConfig, TritonAttentionBackend
from kvtier.attention.triton_kernels import fix_interpreter_scalar_index

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 12, 2, 128, 16, 28
BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_DIM * 2  # K and V, bf16, one layer


class DecodeBatch:
    """One decode step of `batch` sequences over `layers` layers, each layer its own cache."""

    def __init__(self, contexts: list[int], layers: int, device: torch.device) -> None:
        widths = [triton.cdiv(n, BLOCK_SIZE) for n in contexts]
        num_blocks = sum(widths) + 1
        pages = list(range(1, num_blocks))
        random.Random(0).shuffle(pages)
        table = torch.zeros(len(contexts), max(widths), dtype=torch.int32)
        slots = []
        for i, (n, width) in enumerate(zip(contexts, widths, strict=True)):
            row = [pages.pop() for _ in range(width)]
            table[i, :width] = torch.tensor(row, dtype=torch.int32)
            slots.append(row[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE)
        batch = len(contexts)
        self.contexts = contexts
        self.args = dict(
            num_tokens=batch, num_seqs=batch, num_decodes=batch,
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(contexts, dtype=torch.int32, device=device),
            block_table=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=list(contexts),
            max_query_len=1, max_seq_len=max(contexts), block_size=BLOCK_SIZE)
        self.caches = [torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                   dtype=torch.bfloat16, device=device) for _ in range(layers)]
        self.q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
        self.k = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
        self.v = torch.randn_like(self.k)

    def kv_bytes(self) -> int:
        return sum(self.contexts) * BYTES_PER_TOKEN * len(self.caches)

    def forward(self, backend: TritonAttentionBackend | TorchAttentionBackend,
                num_layers: int | None = None) -> list[torch.Tensor]:
        """The decode forward of the first `num_layers` layers (default: all)."""
        metadata = AttentionMetadata(**self.args)
        backend.prepare(metadata)
        return [backend.forward(self.q, self.k, self.v, cache, metadata, HEAD_DIM ** -0.5)
                for cache in self.caches[:num_layers]]


def graph_ms(batch: DecodeBatch, backend: TritonAttentionBackend, rounds: int) -> float:
    """Median ms of one replay of the 28 layers' decode forward, captured in one graph."""
    batch.forward(backend)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batch.forward(backend)
    return cuda_time(graph.replay, repeat=rounds) * 1e3


def copy_rate_gbs() -> float:
    """Device copy rate of a 1 GiB buffer: bytes read plus bytes written, over its time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src), repeat=5) / 1e9


def check(batch: DecodeBatch, backend: TritonAttentionBackend) -> float:
    """Largest difference from the torch reference on the first layer."""
    (out,) = batch.forward(backend, num_layers=1)
    (ref,) = batch.forward(TorchAttentionBackend(), num_layers=1)
    return (out.float() - ref.float()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="split_sweep.json")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, checks only")
    parser.add_argument("--tiles", action="store_true",
                        help="also other tile configs (P's batches), and every split count")
    args = parser.parse_args()
    rng = random.Random(1)
    if args.smoke:
        fix_interpreter_scalar_index()
        batch = DecodeBatch([rng.randint(40, 80) for _ in range(3)], 1, torch.device("cpu"))
        for splits in (1, 2, 3):
            print("smoke splits", splits, "err",
                  check(batch, TritonAttentionBackend(num_decode_splits=splits, num_sms=4)))
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    rate = copy_rate_gbs()
    print(f"{name}, {num_sms} SMs, copy rate {rate:.0f} GB/s", flush=True)
    report: dict = {"card": name, "num_sms": num_sms, "copy_gbs": rate, "cases": []}
    # P's contexts: a 4,096-token prefix, a 256-token suffix, up to 128 generated; S's
    # (ShareGPT) a few hundred to a couple of thousand tokens at larger batches.
    cases = [("P", [4352 + rng.randint(0, 127) for _ in range(size)], args.tiles)
             for size in (8, 16, 24, 32, 48, 64, 96, 128, 192)]
    cases += [("S", [rng.randint(150, 1500) for _ in range(size)], False)
              for size in (32, 64, 128, 256)]
    for workload, contexts, tiles in cases:
        report["cases"].append(sweep_case(workload, contexts, tiles, rate, args.rounds))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def sweep_case(workload: str, contexts: list[int], tiles: bool, rate: float,
               rounds: int) -> dict:
    """Time the default split count against others (and, with tiles, other tile configs)."""
    size = len(contexts)
    batch = DecodeBatch(contexts, NUM_LAYERS, torch.device("cuda"))
    # K/V read once at the copy rate (a copy's read and written bytes over its time).
    floor_ms = batch.kv_bytes() / rate / 1e6
    default = TritonAttentionBackend()
    chosen = default.num_splits(_data(default, batch), NUM_KV_HEADS)
    variants: list[tuple[str, TritonAttentionBackend]] = [("default", default)]
    useful = triton.cdiv(max(contexts), 128)
    for splits in sorted({1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32} - {chosen}):
        if splits <= useful and (splits <= 2 * chosen + 2 or tiles):
            variants.append((f"splits {splits}", TritonAttentionBackend(num_decode_splits=splits)))
    if tiles:
        for config in (DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 4), DecodeConfig(128, 4, 2),
                       DecodeConfig(128, 8, 2), DecodeConfig(64, 8, 3), DecodeConfig(32, 4, 4)):
            variants.append((f"{config}", TritonAttentionBackend(decode_config=config)))
    rows = []
    for label, backend in variants:
        try:
            err = check(batch, backend)
            ms = graph_ms(batch, backend, rounds)
        except Exception as exc:  # a tile that does not fit: report and go on
            print(f"  {workload} batch {size} {label}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        splits = backend.num_splits(_data(backend, batch), NUM_KV_HEADS)
        row = {"label": label, "splits": splits, "ms": round(ms, 4),
               "us_per_layer": round(ms * 1e3 / NUM_LAYERS, 2),
               "tb_s": round(batch.kv_bytes() / ms / 1e9, 3),
               "x_floor": round(ms / floor_ms, 3), "err": err}
        rows.append(row)
        print(f"  {workload} batch {size:3d} {label:40s} splits {splits:3d} {ms:7.3f} ms "
              f"({row['us_per_layer']:6.2f} us/layer, {row['tb_s']:.2f} TB/s, "
              f"{row['x_floor']:.2f}x floor) err {err:.4f}", flush=True)
    best = min(rows, key=lambda r: r["ms"])
    print(f"{workload} batch {size}: default {chosen} splits {rows[0]['ms']:.3f} ms, best "
          f"{best['label']} {best['ms']:.3f} ms", flush=True)
    del batch
    torch.cuda.empty_cache()
    return {"workload": workload, "batch": size, "default_splits": chosen,
            "floor_ms": floor_ms, "rows": rows}


def _data(backend: TritonAttentionBackend, batch: DecodeBatch):  # noqa: ANN202
    metadata = AttentionMetadata(**batch.args)
    backend.prepare(metadata)
    return metadata.backend_data


if __name__ == "__main__":
    main()
