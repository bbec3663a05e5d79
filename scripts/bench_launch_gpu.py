"""Host time of the attention backend's eager launches: Triton's `JITFunction.run` against
`CachedKernel` (issue 6; kvtier/triton_launch.py).

A prefill step outside the decode graphs runs attention eagerly in each layer; Q's tier hits
spend most of such a step's host time launching it. Two measurements per path, host time only
(the GPU is kept busy-free: every figure is a mean over many launches, synchronised once):
- one `kv_write_kernel` launch of 256 tokens;
- one layer's `TritonAttentionBackend.forward` for a Q tier hit's step: a 256-token extend
  after a 4,096-token cached prefix and three decodes of ~4,200 tokens (Qwen2.5-1.5B's
  attention: 12 query heads, 2 KV heads, 128 dims, bf16, 16-token blocks).
Variants run in one process (`CachedKernel.enabled` toggled), interleaved over rounds: Triton's
own launches or cached ones; the decodes through the decode kernels or launched with the
extend (`max_merged_decodes`); the K/V write launched by `forward` or left to the caller (the
piecewise graphs write it). The device time per layer of each comes from CUDA-graph replays.

    PYTHONPATH=src python3 scripts/bench_launch_gpu.py [--out launch.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from tune_attention import make_step  # scripts/ is on sys.path when this runs as a script

from kvtier.attention import triton_backend
from kvtier.attention.base import AttentionMetadata
from kvtier.attention.triton_backend import TritonAttentionBackend, write_kv

HEADS, KV_HEADS, DIM, BLOCK = 12, 2, 128, 16  # as tune_attention's steps
CACHED = (triton_backend.kv_write_kernel, triton_backend.prefill_kernel,
          triton_backend.decode_partial_kernel, triton_backend.decode_reduce_kernel)


def set_cached(on: bool) -> None:
    for kernel in CACHED:
        kernel.enabled = on


def hit_step(device: torch.device) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Three decodes then one 256-token extend after 4,096 cached tokens, paged at random."""
    cached = [4_199, 4_229, 4_259, 4_096]
    new_tokens = [1, 1, 1, 256]
    width = max(-(-(c + n) // BLOCK) for c, n in zip(cached, new_tokens, strict=True))
    metadata, kv_cache = make_step(new_tokens, cached, 3, len(cached) * width, device)
    qkv = torch.randn(sum(new_tokens), (HEADS + 2 * KV_HEADS) * DIM, device=device,
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


def device_us(fn, layers: int = 28, replays: int = 20) -> float:
    """GPU time of one call: `layers` calls captured in a CUDA graph, replayed."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(layers):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * layers) * 1e3


VARIANTS = {  # name: (cached launches, decodes merged up to, K/V written by the caller)
    "jit, separate decodes, kv write": (False, 0, False),
    "cached, separate decodes, kv write": (True, 0, False),
    "cached, separate decodes": (True, 0, True),
    "cached, merged decodes": (True, 4, True),
}


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
    backends = {name: TritonAttentionBackend(max_merged_decodes=merged)
                for name, (_, merged, _) in VARIANTS.items()}
    steps = {}
    for name, backend in backends.items():  # each backend's own step data
        step = dataclasses.replace(metadata)
        backend.prepare(step)
        steps[name] = step

    def layer(name: str):  # noqa: ANN202
        cached, _, written = VARIANTS[name]
        backend, step = backends[name], steps[name]
        return lambda: backend.forward(q, k, v, kv_cache, step, DIM ** -0.5, kv_written=written)

    def kv_write() -> None:
        write_kv(k[-256:], v[-256:], kv_cache, metadata.slot_mapping[-256:], BLOCK)

    outputs = {}
    for name, (cached, _, _) in VARIANTS.items():  # compile and warm; outputs must agree
        set_cached(cached)
        for _ in range(3):
            out = layer(name)()
        torch.cuda.synchronize()
        outputs[name] = out.clone()
    host: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for on in (False, True):
            set_cached(on)
            host.setdefault(f"kv_write {'cached' if on else 'jit'}", []).append(
                host_us(kv_write, args.launches))
        for name, (cached, _, _) in VARIANTS.items():
            set_cached(cached)
            host.setdefault(name, []).append(host_us(layer(name), args.launches))
    set_cached(True)
    gpu = {name: round(device_us(layer(name)), 2) for name in VARIANTS}
    reference = outputs[next(iter(VARIANTS))].float()
    report = {
        "card": torch.cuda.get_device_name(),
        "max_abs_diff_to_first": {n: float((o.float() - reference).abs().max())
                                  for n, o in outputs.items()},
        "median_host_us": {name: round(statistics.median(v), 2) for name, v in host.items()},
        "device_us_per_layer": gpu,
        "rounds": host,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
