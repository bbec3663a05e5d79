"""`small_linear` configs against the unfused layers (cuBLAS + separate norm/SiLU kernels) on
the projections of the Qwen2.5-1.5B shape at decode batch sizes.

Each measurement replays a CUDA graph of 28 calls, one per layer, each with its own weight
(the 28 weights together far exceed L2, as in a decode step), and reports microseconds per
call and the weight-read rate. The unfused row is what a decode step ran before `small_linear`:
add_rmsnorm + F.linear for qkv, F.linear for o, add_rmsnorm + F.linear + silu_and_mul for
gate/up, F.linear for down.

    PYTHONPATH=src:scripts python3 scripts/tune_small_linear.py --out $OUT/small_linear.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script

from kvtier import triton_pdl
from kvtier.model import triton_ops
from kvtier.model.triton_linear import SmallLinearConfig, default_config, small_linear

LAYERS = 28
HIDDEN, INTERMEDIATE, QKV = 1536, 8960, 2048
EPS = 1e-6
CONFIGS = [SmallLinearConfig(n, k, w, 1) for n, k, w in [
    (4, 2048, 4), (2, 2048, 4), (4, 2048, 8), (8, 2048, 8), (4, 1024, 4), (2, 1024, 4),
    (4, 1024, 8), (8, 1024, 8), (4, 512, 4)]]
"""The register kernel: num_stages stays 1 (its loop is a plain `range`); bytes in flight come
from wide K tiles, the kernel's own prefetch of the next tile and many programs per SM.
Keeping two tiles ahead was slower for down at every tile (13.4-20.5 us against 10.3, H200,
2026-11-28), so the kernel keeps one."""

STREAMED_CONFIGS = [SmallLinearConfig(n, k, w, s, programs_per_sm=p) for n, k, w, s, p in [
    # K up to 2,048 in one chunk (gate_up, o): the input is read and normed once per program.
    (1, 2048, 4, 3, 8), (1, 2048, 4, 4, 6), (1, 2048, 4, 6, 4), (1, 2048, 8, 4, 4),
    (2, 2048, 4, 3, 4), (2, 2048, 4, 4, 3), (2, 2048, 4, 4, 2), (2, 2048, 8, 4, 2),
    (4, 2048, 8, 3, 2), (4, 2048, 8, 2, 2),
    # K chunked (down; gate_up's best chunked ones, 2026-11-28 call 1).
    (4, 512, 4, 4, 4), (8, 256, 4, 4, 2), (4, 1024, 4, 4, 4), (4, 1024, 4, 6, 4),
    (4, 1024, 4, 3, 4), (4, 1024, 8, 4, 4), (8, 1024, 4, 4, 2), (8, 1024, 8, 4, 2),
    (2, 2048, 4, 4, 4), (4, 512, 4, 8, 4), (4, 512, 4, 6, 6)]]
"""The streamed kernel (persistent programs, weight chunks pipelined through shared memory):
column tile x K chunk, warps, pipeline depth, programs per SM."""


def graphed(calls: list[Callable[[], object]]) -> Callable[[], None]:
    """One CUDA graph replaying every call in order."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph.replay


def projection_cases(rows: int, device: torch.device) -> dict[str, dict]:
    """Per projection: its weights (one per layer), inputs, and the unfused and fused calls."""
    dtype = torch.bfloat16

    def weights(n: int, k: int) -> list[torch.Tensor]:
        return [torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5 for _ in range(LAYERS)]

    hidden = torch.randn(rows, HIDDEN, device=device, dtype=dtype)
    residual = torch.randn(rows, HIDDEN, device=device, dtype=dtype)
    attention = torch.randn(rows, HIDDEN, device=device, dtype=dtype)
    activation = torch.randn(rows, INTERMEDIATE, device=device, dtype=dtype)
    norm = torch.ones(HIDDEN, device=device, dtype=dtype)
    bias = torch.randn(QKV, device=device, dtype=dtype)
    qkv_w, o_w = weights(QKV, HIDDEN), weights(HIDDEN, HIDDEN)
    gate_up_w, down_w = weights(2 * INTERMEDIATE, HIDDEN), weights(HIDDEN, INTERMEDIATE)
    scratch = residual.clone()

    def unfused_qkv(w: torch.Tensor) -> Callable[[], object]:
        return lambda: F.linear(triton_ops.add_rmsnorm(hidden, scratch, norm, EPS), w, bias)

    def unfused_gate_up(w: torch.Tensor) -> Callable[[], object]:
        return lambda: triton_ops.silu_and_mul(
            F.linear(triton_ops.add_rmsnorm(hidden, scratch, norm, EPS), w))

    return {
        "qkv+norm+bias": dict(
            weights=qkv_w, unfused=unfused_qkv,
            fused=lambda w, c: lambda: small_linear(hidden, w, bias, norm_weight=norm, eps=EPS,
                                                    residual=residual, config=c)),
        "o": dict(weights=o_w, unfused=lambda w: lambda: F.linear(attention, w),
                  fused=lambda w, c: lambda: small_linear(attention, w, config=c)),
        "gate_up+norm+silu": dict(
            weights=gate_up_w, unfused=unfused_gate_up,
            fused=lambda w, c: lambda: small_linear(hidden, w, norm_weight=norm, eps=EPS,
                                                    residual=residual, gated=True, config=c)),
        "down": dict(weights=down_w, unfused=lambda w: lambda: F.linear(activation, w),
                     fused=lambda w, c: lambda: small_linear(activation, w, config=c)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="small_linear.json")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--projections", nargs="+",
                        default=["qkv+norm+bias", "o", "gate_up+norm+silu", "down"])
    parser.add_argument("--kernels", choices=["register", "streamed", "both"], default="both",
                        help="which small_linear kernel's configs to time")
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict = {"card": torch.cuda.get_device_name(), "results": []}
    print("card:", report["card"], flush=True)
    for rows in args.rows:
        for name, case in projection_cases(rows, device).items():
            if name not in args.projections:
                continue
            weight_bytes = sum(w.numel() * w.element_size() for w in case["weights"]) / LAYERS
            rows_out = []
            # Each config with programmatic dependent launch; the unfused calls and the
            # default config also without, to show what PDL alone gives.
            timed = [("unfused", None, False), ("unfused pdl", None, True),
                     ("default", default_config(*case["weights"][0].shape), False)]
            if args.kernels != "streamed":
                timed += [(f"{c.block_n}x{c.block_k} w{c.num_warps} pdl", c, True)
                          for c in CONFIGS]
            if args.kernels != "register":
                timed += [(f"streamed {c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} "
                           f"p{c.programs_per_sm} pdl", c, True) for c in STREAMED_CONFIGS]
            for label, config, pdl in timed:
                if config is not None and config.programs_per_sm and name.startswith("qkv"):
                    continue  # the qkv epilogue needs the register kernel
                triton_pdl.set_enabled(pdl)
                if config is None:
                    calls = [case["unfused"](w) for w in case["weights"]]
                else:
                    calls = [case["fused"](w, config) for w in case["weights"]]
                try:
                    seconds = cuda_time(graphed(calls), repeat=20) / LAYERS
                except Exception as error:  # noqa: BLE001 - a config that does not compile
                    print(f"  {rows:>2} {name:18} {label:18} failed: {error}", flush=True)
                    continue
                rows_out.append({"rows": rows, "projection": name, "config": label,
                                 "us": seconds * 1e6, "tb_s": weight_bytes / seconds / 1e12})
                print(f"  {rows:>2} {name:18} {label:18} {seconds * 1e6:7.2f} us "
                      f"{weight_bytes / seconds / 1e12:5.2f} TB/s", flush=True)
            triton_pdl.set_enabled(None)
            fused = [r for r in rows_out if not r["config"].startswith("unfused")]
            best = min(fused, key=lambda r: r["us"])
            print(f"== {rows} {name}: unfused {rows_out[0]['us']:.2f} us, best {best['config']} "
                  f"{best['us']:.2f} us", flush=True)
            report["results"].extend(rows_out)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
