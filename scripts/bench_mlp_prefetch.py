"""Does asking L2 for the MLP's down weights ahead of time speed up the batch-1 MLP? (GPU)

At decode batch 1 the MLP is ~27 of ~42 us per layer of Qwen2.5-1.5B on an H200: the norm
kernel, cuBLAS's gate_up (55 MB) at ~3.3 TB/s, then the streamed down (27.5 MB) at ~2.8 TB/s,
against ~4.1 TB/s of copy rate. Neither stream fills HBM, and down's ramp-up waits for
gate_up's last program. Here the norm kernel before gate_up also issues L2 prefetches
(fire-and-forget: nothing waits for them) of down's weights, and optionally of gate_up's first
bytes, so HBM's spare bandwidth during gate_up fetches down and down reads L2.

Each variant is 28 layers (distinct weights: 2.3 GB, far beyond L2) of
norm -> gate_up -> down captured in one CUDA graph, replays interleaved, medians of rounds.
Outputs must be bit-identical across variants (a prefetch moves no data the kernels see).

    python scripts/bench_mlp_prefetch.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from kvtier.model import triton_linear
from kvtier.triton_pdl import await_previous_kernel, launch_options

HIDDEN, INTER, LAYERS = 1536, 8960, 28
LINE = 128


@triton.jit
def _prefetch_lines(base_ptr, nbytes, pid, programs, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of [0, nbytes) of base (a byte pointer) asked of L2, one 128-byte
    line per element. MODE 1: evict_last priority; 2: evict_normal; 3: bulk (TMA) prefetch of
    16 KB per element."""
    if MODE == 3:
        share = tl.cdiv(tl.cdiv(nbytes, 16384), programs)
        lanes = pid.to(tl.int64) * share + tl.arange(0, BLOCK)
        offsets = lanes * 16384
        inside = ((tl.arange(0, BLOCK) < share) & (offsets < nbytes)).to(tl.int32)
        size = tl.full([BLOCK], 16384, tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [base_ptr + offsets, inside, size], dtype=tl.int32, is_pure=False,
            pack=1)
    else:
        lines = tl.cdiv(nbytes, 128)
        share = tl.cdiv(lines, programs)
        first = pid.to(tl.int64) * share
        for start in range(0, share, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            line = first + idx
            inside = ((idx < share) & (line < lines)).to(tl.int32)
            if MODE == 1:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; "
                    "@p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [base_ptr + line * 128, inside], dtype=tl.int32,
                    is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; "
                    "@p prefetch.global.L2::evict_normal [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [base_ptr + line * 128, inside], dtype=tl.int32,
                    is_pure=False, pack=1)


@triton.jit
def _norm_prefetch_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, pf_ptr, pf_bytes,
                          pf2_ptr, pf2_bytes, MODE: tl.constexpr, BLOCK: tl.constexpr,
                          PF_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """add + RMSNorm of one row (program 0), and every program's share of the prefetches,
    issued before the PDL wait (weights: no kernel writes them)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if MODE > 0:
        _prefetch_lines(pf_ptr, pf_bytes, pid, programs, MODE, PF_BLOCK)
        _prefetch_lines(pf2_ptr, pf2_bytes, pid, programs, MODE, PF_BLOCK)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    await_previous_kernel(PDL)
    if pid == 0:
        weight = tl.load(w_ptr + cols, mask=mask, other=0.0)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
        res = tl.load(res_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(res_ptr + cols, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / n_cols
        normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
        tl.store(out_ptr + cols, (normed.to(tl.float32) * weight.to(tl.float32)).to(x.dtype),
                 mask=mask)


class Layers:
    def __init__(self, device: torch.device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        scale = 0.02
        self.gate_up = [torch.randn(2 * INTER, HIDDEN, device=device, generator=g,
                                    dtype=torch.bfloat16) * scale for _ in range(LAYERS)]
        self.down = [torch.randn(HIDDEN, INTER, device=device, generator=g,
                                 dtype=torch.bfloat16) * scale for _ in range(LAYERS)]
        self.norm = [1 + 0.1 * torch.randn(HIDDEN, device=device, generator=g,
                                           dtype=torch.bfloat16) for _ in range(LAYERS)]
        self.x0 = torch.randn(1, HIDDEN, device=device, generator=g, dtype=torch.bfloat16)


def mlp_step(layers: Layers, x: torch.Tensor, residual: torch.Tensor, variant: dict,
             sms: int) -> torch.Tensor:
    down_config = triton_linear.choose_config(1, HIDDEN, INTER)
    for i in range(LAYERS):
        if variant["gate_up"] == "triton":
            config = triton_linear.choose_config(1, 2 * INTER, HIDDEN)
            act, residual = triton_linear.small_linear(
                x, layers.gate_up[i], norm_weight=layers.norm[i], eps=1e-6, residual=residual,
                gated=True, config=config)
            x = triton_linear.small_linear(act, layers.down[i], config=down_config)[0]
            continue
        normed = torch.empty_like(x)
        mode = variant["mode"]
        down = layers.down[i].view(-1).view(torch.uint8)
        gate_up = layers.gate_up[i].view(-1).view(torch.uint8)
        gate_up_bytes = min(variant.get("gate_up_mb", 0) << 20, gate_up.numel())
        _norm_prefetch_kernel[(sms if mode else 1,)](
            x, residual, layers.norm[i], normed, HIDDEN, 1e-6, down,
            down.numel() if variant.get("down", True) else 0, gate_up, gate_up_bytes,
            MODE=mode, BLOCK=2048, PF_BLOCK=256, num_warps=4, **launch_options(x))
        gate_up_out = torch.mm(normed, layers.gate_up[i].t())
        x = triton_linear.small_linear(gate_up_out, layers.down[i], gated_input=True,
                                       config=down_config)[0]
    return x


VARIANTS = {
    "cublas, no prefetch": {"gate_up": "cublas", "mode": 0},
    "cublas, down evict_last": {"gate_up": "cublas", "mode": 1},
    "cublas, down evict_normal": {"gate_up": "cublas", "mode": 2},
    "cublas, down bulk": {"gate_up": "cublas", "mode": 3},
    "cublas, down + 8 MB gate_up evict_last": {"gate_up": "cublas", "mode": 1, "gate_up_mb": 8},
    "cublas, down + 16 MB gate_up evict_last": {"gate_up": "cublas", "mode": 1,
                                                "gate_up_mb": 16},
    "cublas, 16 MB gate_up only evict_last": {"gate_up": "cublas", "mode": 1, "gate_up_mb": 16,
                                              "down": False},
    "triton gate_up (norm fused)": {"gate_up": "triton"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the medians here")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(device))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    layers = Layers(device)
    graphs, outputs = {}, {}
    for name, variant in VARIANTS.items():
        x = layers.x0.clone()
        residual = torch.zeros_like(x)
        static = (x, residual)
        for _ in range(2):  # compile, warm up
            static[1].zero_()
            mlp_step(layers, static[0], static[1], variant, sms)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        static[1].zero_()
        with torch.cuda.graph(graph):
            out = mlp_step(layers, static[0], static[1], variant, sms)
        graphs[name] = (graph, static, out)
    # Correctness: one replay each from the same inputs.
    for name, (graph, (_x, residual), out) in graphs.items():
        residual.zero_()
        graph.replay()
        torch.cuda.synchronize()
        outputs[name] = out.clone()
    reference = outputs["cublas, no prefetch"]
    for name, value in outputs.items():
        same = torch.equal(value, reference)
        diff = (value.float() - reference.float()).abs().max().item()
        print(f"{name:45s} identical to no prefetch: {same}"
              + ("" if same else f" (max diff {diff:.3g})"))
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(args.rounds):
        for name, (graph, _static, _out) in graphs.items():
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / args.replays / LAYERS * 1000)
    weight_bytes = (2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    result = {}
    print(f"\nus per layer's MLP (median of {args.rounds} rounds x {args.replays} replays of "
          f"{LAYERS} layers); {weight_bytes / 1e6:.1f} MB of weights per layer")
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = median
        print(f"{name:45s} {median:7.2f} us  ({weight_bytes / median / 1e6:.2f} TB/s)  "
              f"[{min(values):.2f}-{max(values):.2f}]")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(device), "us_per_layer": result},
                      handle, indent=1)


if __name__ == "__main__":
    main()
