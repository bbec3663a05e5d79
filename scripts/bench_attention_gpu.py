"""Triton attention kernels on the Qwen2.5-1.5B attention shape (12 query / 2 KV heads, d=128,
bf16, block_size 16), next to torch SDPA / the torch reference backend on the same inputs.

Prints the GPU, the measured bf16 matmul rate and device copy bandwidth (the floors), then:
  prefill  8,192 tokens, no prefix: TFLOP/s (causal FLOPs) of the Triton kernel, the backend's
           forward (KV write + kernel), SDPA flash on contiguous K/V and the torch reference;
  extend   2,048 tokens on a 6,144-token cached prefix: Triton vs the torch reference;
  decode   batch 1/32/256 at 4k context and batch 1 at 16k: GB/s of K/V read by the backend's
           forward under a CUDA graph and eagerly, and by the torch reference (eager).
Every Triton result is checked against the torch reference once (max abs error printed).

    python scripts/bench_attention_gpu.py            # about 30 s on an H100
    python scripts/bench_attention_gpu.py --sweep    # + other tiles and split counts (~1 min)
    TRITON_INTERPRET=1 python scripts/bench_attention_gpu.py --smoke   # tiny sizes, on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.attention.triton_backend import (
    DecodeConfig,
    PrefillConfig,
    TritonAttentionBackend,
    default_prefill_config,
    run_prefill,
)
from kvtier.attention.triton_kernels import fix_interpreter_scalar_index

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 2, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM ** -0.5


class Case:
    """A paged batch: decodes (prefix = context - 1, one new token) then prefill chunks."""

    def __init__(self, seqs: list[tuple[int, int]], num_decodes: int,
                 device: torch.device) -> None:
        lens = [p + q for p, q in seqs]
        blocks = [triton.cdiv(n, BLOCK_SIZE) for n in lens]
        total = sum(blocks) + 1
        perm = torch.randperm(total - 1, device=device).to(torch.int32) + 1
        width = max(blocks)
        table = torch.zeros(len(seqs), width, dtype=torch.int32, device=device)
        starts, slots, used = [0], [], 0
        for i, ((prefix, query_len), n) in enumerate(zip(seqs, blocks, strict=True)):
            table[i, :n] = perm[used:used + n]
            used += n
            pos = torch.arange(prefix, prefix + query_len, device=device)
            slots.append(table[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
            starts.append(starts[-1] + query_len)
        tokens = starts[-1]
        self.kv_cache = torch.randn(2, total, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE,
                                    device=device)
        self.query = torch.randn(tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
        self.key = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
        self.value = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
        self.seqs = seqs
        self.args = dict(
            num_tokens=tokens, num_seqs=len(seqs), num_decodes=num_decodes,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_table=table,
            slot_mapping=torch.cat(slots), query_start_loc_cpu=starts, seq_lens_cpu=lens,
            max_query_len=max(q for _, q in seqs), max_seq_len=max(lens), block_size=BLOCK_SIZE)

    def metadata(self, backend: TritonAttentionBackend | TorchAttentionBackend
                 ) -> AttentionMetadata:
        metadata = AttentionMetadata(**self.args)
        backend.prepare(metadata)
        return metadata

    def forward(self, backend: TritonAttentionBackend | TorchAttentionBackend,
                metadata: AttentionMetadata) -> torch.Tensor:
        return backend.forward(self.query, self.key, self.value, self.kv_cache, metadata, SCALE)

    def attended_pairs(self) -> int:
        """(query, key) pairs under the causal mask, summed over sequences."""
        return sum(q * p + q * (q + 1) // 2 for p, q in self.seqs)

    def kv_bytes(self) -> int:
        elt = self.kv_cache.element_size()
        return sum(p + q for p, q in self.seqs) * KV_HEADS * HEAD_DIM * 2 * elt


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds per call: CUDA events on a GPU, wall clock on CPU (no warm-up)."""
    for _ in range(warmup if device.type == "cuda" else 0):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn: Callable[[], object], iters: int, reps: int = 20) -> float:
    """Median milliseconds per call of fn captured `reps` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_ms(graph.replay, torch.device("cuda"), iters) / reps


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def floors(device: torch.device, iters: int) -> None:
    a = torch.randn(8192, 8192, dtype=DTYPE, device=device)
    ms = time_ms(lambda: a @ a, device, iters)
    print(f"floor  bf16 matmul 8192^3: {2 * 8192 ** 3 / ms / 1e9:8.1f} TFLOP/s")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters)
    print(f"floor  device copy 1 GiB:  {2 * src.numel() / ms / 1e6:8.1f} GB/s (read + write)")


def bench_prefill(name: str, case: Case, device: torch.device, iters: int,
                  sdpa: bool) -> None:
    flops = 4 * case.attended_pairs() * HEADS * HEAD_DIM
    triton_backend, torch_backend = TritonAttentionBackend(), TorchAttentionBackend()
    meta, ref_meta = case.metadata(triton_backend), case.metadata(torch_backend)
    err = max_err(case.forward(triton_backend, meta), case.forward(torch_backend, ref_meta))
    rows = {
        "triton kernel": lambda: run_prefill(case.query, case.kv_cache, meta, meta.backend_data,
                                             torch.empty_like(case.query), SCALE,
                                             default_prefill_config(HEAD_DIM)),
        "triton forward (write + kernel)": lambda: case.forward(triton_backend, meta),
        "torch reference forward": lambda: case.forward(torch_backend, ref_meta),
    }
    if sdpa:
        q = case.query.transpose(0, 1)[None]
        k = case.key.transpose(0, 1)[None].repeat_interleave(HEADS // KV_HEADS, 1)
        v = case.value.transpose(0, 1)[None].repeat_interleave(HEADS // KV_HEADS, 1)
        rows["torch SDPA (flash, contiguous K/V)"] = lambda: _flash(q, k, v)
    print(f"\n{name}: {case.attended_pairs() / 1e6:.1f}M causal pairs, "
          f"max |err| vs reference {err:.4f}")
    for label, fn in rows.items():
        ms = time_ms(fn, device, iters)
        print(f"  {label:36s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)


def bench_decode(batch: int, context: int, device: torch.device, iters: int,
                 backend: TritonAttentionBackend | None = None) -> None:
    case = Case([(context - 1, 1)] * batch, batch, device)
    triton_backend = backend or TritonAttentionBackend()
    torch_backend = TorchAttentionBackend()
    meta, ref_meta = case.metadata(triton_backend), case.metadata(torch_backend)
    err = max_err(case.forward(triton_backend, meta), case.forward(torch_backend, ref_meta))
    splits = triton_backend.num_splits(meta.backend_data, KV_HEADS)
    kv_bytes = case.kv_bytes()
    timings = {}
    if device.type == "cuda":
        timings["triton (graph)"] = graph_ms(lambda: case.forward(triton_backend, meta), iters)
    timings["triton (eager)"] = time_ms(lambda: case.forward(triton_backend, meta), device,
                                        iters)
    timings["torch ref (eager)"] = time_ms(lambda: case.forward(torch_backend, ref_meta),
                                           device, iters)
    line = "  ".join(f"{k} {ms * 1e3:8.1f} us {kv_bytes / ms / 1e6:7.1f} GB/s"
                     for k, ms in timings.items())
    print(f"  batch {batch:3d} ctx {context:6d} splits {splits:3d} "
          f"KV {kv_bytes / 2 ** 20:8.1f} MiB  err {err:.4f}  {line}")


def sweep(device: torch.device, iters: int, prefill_len: int, decode_ctx: int) -> None:
    case = Case([(0, prefill_len)], 0, device)
    flops = 4 * case.attended_pairs() * HEADS * HEAD_DIM
    print("\nsweep: prefill kernel (block_m, block_n, num_warps, num_stages)")
    for config in [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 8, 2),
                   PrefillConfig(128, 128, 8, 2), PrefillConfig(128, 128, 8, 3),
                   PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 32, 8, 4)]:
        backend = TritonAttentionBackend(prefill_config=config)
        meta = case.metadata(backend)
        out = torch.empty_like(case.query)
        try:
            ms = time_ms(lambda c=config, m=meta, o=out: run_prefill(
                case.query, case.kv_cache, m, m.backend_data, o, SCALE, c), device, iters)
            print(f"  {config}  {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")
        except Exception as exc:  # out of shared memory etc.: report and go on
            print(f"  {config}  failed: {type(exc).__name__}: {str(exc)[:100]}")
    print("sweep: decode tiles (block_n, num_warps, num_stages) at batch 32 and 1")
    for config in [DecodeConfig(64, 4, 3), DecodeConfig(32, 4, 4), DecodeConfig(128, 4, 2),
                   DecodeConfig(64, 4, 2), DecodeConfig(64, 8, 3)]:
        print(f"  {config}")
        for batch in (32, 1):
            bench_decode(batch, decode_ctx, device, iters, TritonAttentionBackend(
                decode_config=config))
    print("sweep: decode split counts (default tiles)")
    for batch, context, splits in ([(32, decode_ctx, n) for n in (2, 5, 10, 20)]
                                   + [(1, 4 * decode_ctx, n) for n in (32, 64, 128)]
                                   + [(256, decode_ctx, n) for n in (1, 2)]):
        bench_decode(batch, context, device, iters,
                     TritonAttentionBackend(num_decode_splits=splits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also try other tile configs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter)")
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")
    if device.type != "cuda" and not interpret:
        raise SystemExit("needs a CUDA device (or TRITON_INTERPRET=1 with --smoke)")
    if interpret:
        fix_interpreter_scalar_index()
    torch.manual_seed(0)
    iters = 1 if args.smoke else args.iters
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"shape H={HEADS} KVH={KV_HEADS} d={HEAD_DIM} {DTYPE} block_size={BLOCK_SIZE}")
    if not args.smoke:
        floors(device, iters)
    prefill, extend = (256, (192, 64)) if args.smoke else (8192, (6144, 2048))
    bench_prefill(f"prefill {prefill}", Case([(0, prefill)], 0, device), device, iters,
                  sdpa=device.type == "cuda")
    bench_prefill(f"extend {extend[1]} on a {extend[0]}-token prefix", Case([extend], 0, device),
                  device, iters, sdpa=False)
    print("\ndecode (one layer: KV write + attention; GB/s of K/V context read)")
    shapes = [(1, 300), (4, 300)] if args.smoke else [(1, 4096), (32, 4096), (256, 4096),
                                                     (1, 16384)]
    for batch, context in shapes:
        bench_decode(batch, context, device, iters)
    if args.sweep:
        sweep(device, iters, 256 if args.smoke else 8192, 300 if args.smoke else 4096)


if __name__ == "__main__":
    main()
