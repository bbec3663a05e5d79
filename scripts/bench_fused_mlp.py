"""An experiment, not adopted: the batch-1 MLP as one streaming pass over its weights, against
what the decode step runs (the residual add + RMSNorm kernel, cuBLAS's gate_up, the streamed
`small_linear` down taking the SiLU-and-mul), on the Qwen2.5-1.5B shape in bf16.

The fused kernel splits the intermediate dimension among persistent programs: each computes
its slice of silu(gate) * up from gate_up's rows and at once multiplies it by the matching
rows of down's transpose (stored (F, K), so a slice is contiguous rows), accumulating a
partial of the whole output; gate, up and down stream through one software-pipelined loop,
with no wait between the projections. A second, small kernel sums the partials in program
order (deterministic: no atomics). It needs down's weight transposed, a second copy of it.

Each variant is a CUDA graph of 28 layers, each with its own weights (far beyond L2, as in a
decode step), each layer's o projection (`small_linear`) before its MLP so that the MLP
starts behind a kernel as in the model, PDL as the model launches it. Prints microseconds
per layer (o + MLP), the weight-read rate, and one layer's output against float32 math.
On an H200 (BENCHMARKS.md, thirty-third session) the best config saved 1.05 us of the
29.9 per layer, ~2% of a decode step: not worth down's second copy.

    PYTHONPATH=src:scripts python3 scripts/bench_fused_mlp.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_check import cuda_time  # scripts/ is on sys.path when this runs as a script

from kvtier.model import triton_ops
from kvtier.model.triton_linear import (
    _projection_input,
    _silu_and_mul,
    choose_config,
    default_config,
    small_linear,
)
from kvtier.triton_pdl import await_previous_kernel, launch_options


@dataclass(frozen=True)
class FusedMLPConfig:
    block_f: int
    """Intermediate columns per loop step: block_f rows of gate, of up and of down's
    transpose are in flight per pipeline stage."""
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1
    prefetch: bool = False
    split_k: bool = False
    """K as a power-of-two tile and the rest (`_fused_mlp_split_kernel`), not one padded
    tile (no prefetch then)."""
    """Load each program's first tile before waiting for the previous kernel (under PDL,
    while that kernel finishes)."""
    sum_block_k: int = 32
    """Output columns per program of the partials' sum."""


@triton.jit
def _fused_mlp_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, wgu_ptr, wdt_ptr, partial_ptr,
                      K, F, stride_wgu, stride_wdt, eps, HAS_RESIDUAL: tl.constexpr,
                      BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      PREFETCH: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    my_tiles = tl.cdiv(tl.cdiv(F, BLOCK_F) - pid, programs)  # the grid has <= tiles programs
    offs_f = tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    dtype = wgu_ptr.dtype.element_ty
    if PREFETCH:  # weights: written by no kernel, so requested before the wait
        g0, u0, d0 = _load_tile(wgu_ptr, wdt_ptr, pid * BLOCK_F + offs_f, offs_k, k_ok, F,
                                stride_wgu, stride_wdt)
    await_previous_kernel(PDL)

    rows = tl.arange(0, 1)
    x = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, rows < 1, offs_k, k_ok, K, 0, 0,
                          0, pid == 0, HAS_RESIDUAL, False)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / K + eps)
    norm_w = tl.load(norm_w_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    xn = tl.sum(x * norm_w[None, :] * rstd[:, None], axis=0)  # (BLOCK_K,): the one row

    # Down's products accumulate elementwise, summed over the tile's rows once at the end.
    acc = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
    first = 0
    if PREFETCH:
        acc += _tile_product(g0, u0, d0, xn, dtype)
        first = 1
    for i in tl.range(first, my_tiles, num_stages=STAGES):
        g, u, d = _load_tile(wgu_ptr, wdt_ptr, (pid + i * programs) * BLOCK_F + offs_f,
                             offs_k, k_ok, F, stride_wgu, stride_wdt)
        acc += _tile_product(g, u, d, xn, dtype)
    tl.store(partial_ptr + pid * K + offs_k, tl.sum(acc, axis=0), mask=k_ok)


@triton.jit
def _fused_mlp_split_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, wgu_ptr, wdt_ptr,
                            partial_ptr, K, F, stride_wgu, stride_wdt, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK_F: tl.constexpr,
                            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                            STAGES: tl.constexpr, PDL: tl.constexpr):
    """`_fused_mlp_kernel` with K as two tiles, BLOCK_A (a power of two <= K) and BLOCK_B
    (the rest, rounded up to a power of two): K = 1,536 pads nothing, where one
    2,048-wide tile pads each weight row (and its pipeline stage) by a third."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    my_tiles = tl.cdiv(tl.cdiv(F, BLOCK_F) - pid, programs)
    offs_f = tl.arange(0, BLOCK_F)
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = BLOCK_A + tl.arange(0, BLOCK_B)
    a_ok = offs_a < K
    b_ok = offs_b < K
    dtype = wgu_ptr.dtype.element_ty
    await_previous_kernel(PDL)

    rows = tl.arange(0, 1)
    xa = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, rows < 1, offs_a, a_ok, K, 0, 0,
                           0, pid == 0, HAS_RESIDUAL, False)
    xb = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, rows < 1, offs_b, b_ok, K, 0, 0,
                           0, pid == 0, HAS_RESIDUAL, False)
    rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / K + eps)
    wa = tl.load(norm_w_ptr + offs_a, mask=a_ok, other=0.0).to(tl.float32)
    wb = tl.load(norm_w_ptr + offs_b, mask=b_ok, other=0.0).to(tl.float32)
    xna = tl.sum(xa * wa[None, :] * rstd[:, None], axis=0)
    xnb = tl.sum(xb * wb[None, :] * rstd[:, None], axis=0)

    acc_a = tl.zeros([BLOCK_F, BLOCK_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_F, BLOCK_B], dtype=tl.float32)
    for i in tl.range(0, my_tiles, num_stages=STAGES):
        fs = (pid + i * programs) * BLOCK_F + offs_f
        f_ok = fs < F
        ga, ua, da = _load_tile(wgu_ptr, wdt_ptr, fs, offs_a, a_ok, F, stride_wgu, stride_wdt)
        gb, ub, db = _load_tile(wgu_ptr, wdt_ptr, fs, offs_b, b_ok, F, stride_wgu, stride_wdt)
        gate = (tl.sum(ga.to(tl.float32) * xna[None, :], axis=1)
                + tl.sum(gb.to(tl.float32) * xnb[None, :], axis=1)).to(dtype)
        up = (tl.sum(ua.to(tl.float32) * xna[None, :], axis=1)
              + tl.sum(ub.to(tl.float32) * xnb[None, :], axis=1)).to(dtype)
        act = tl.where(f_ok, _silu_and_mul(gate, up).to(tl.float32), 0.0)
        acc_a += act[:, None] * da.to(tl.float32)
        acc_b += act[:, None] * db.to(tl.float32)
    tl.store(partial_ptr + pid * K + offs_a, tl.sum(acc_a, axis=0), mask=a_ok)
    tl.store(partial_ptr + pid * K + offs_b, tl.sum(acc_b, axis=0), mask=b_ok)


@triton.jit
def _load_tile(wgu_ptr, wdt_ptr, fs, offs_k, k_ok, F, stride_wgu, stride_wdt):
    """Rows fs of gate, of up and of down's transpose."""
    mask = (fs < F)[:, None] & k_ok[None, :]
    g = tl.load(wgu_ptr + fs[:, None] * stride_wgu + offs_k[None, :], mask=mask, other=0.0)
    u = tl.load(wgu_ptr + (fs + F)[:, None] * stride_wgu + offs_k[None, :], mask=mask,
                other=0.0)
    d = tl.load(wdt_ptr + fs[:, None] * stride_wdt + offs_k[None, :], mask=mask, other=0.0)
    return g, u, d


@triton.jit
def _tile_product(g, u, d, xn, dtype: tl.constexpr):
    """The tile's share of down's output, per row: silu(gate) * up times down's rows."""
    gate = tl.sum(g.to(tl.float32) * xn[None, :], axis=1).to(dtype)
    up = tl.sum(u.to(tl.float32) * xn[None, :], axis=1).to(dtype)
    act = _silu_and_mul(gate, up).to(tl.float32)  # 0 past F: silu(0) * 0
    return act[:, None] * d.to(tl.float32)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, P, K, BLOCK_P: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    await_previous_kernel(PDL)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):  # in program order: the same sum every time
        ps = p0 + tl.arange(0, BLOCK_P)
        part = tl.load(partial_ptr + ps[:, None] * K + ks[None, :],
                       mask=(ps < P)[:, None] & k_ok[None, :], other=0.0)
        total += tl.sum(part, axis=0)
    tl.store(out_ptr + ks, total.to(out_ptr.dtype.element_ty), mask=k_ok)


def fused_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, gate_up_weight: torch.Tensor, down_weight_t: torch.Tensor,
              config: FusedMLPConfig,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(down(silu(gate) * up of RMSNorm(x + residual)), x + residual) for one row x (1, K):
    gate_up_weight is [gate | up] (2F, K) and down_weight_t down's weight transposed, (F, K).
    residual_out is None without a residual."""
    rows, hidden = x.shape
    inter = down_weight_t.shape[0]
    if rows != 1:
        raise ValueError(f"fused_mlp takes one row, got {rows}")
    if gate_up_weight.shape != (2 * inter, hidden) or down_weight_t.shape != (inter, hidden):
        raise ValueError(f"weights {tuple(gate_up_weight.shape)}, {tuple(down_weight_t.shape)}"
                         f" do not make an MLP of ({2 * inter}, {hidden}), ({inter}, {hidden})")
    for tensor in (x, gate_up_weight, down_weight_t):
        if tensor.stride(-1) != 1 or tensor.dtype != x.dtype:
            raise ValueError("x and the weights must share a dtype, contiguous along K")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} must be ({hidden},)")
    tiles = triton.cdiv(inter, config.block_f)
    programs = min(tiles, _multiprocessors(x.device) * config.programs_per_sm)
    partials = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    options = launch_options(x)
    if config.split_k:
        block_a = 1 << (hidden.bit_length() - 1)
        _fused_mlp_split_kernel[(programs,)](
            x, residual if residual is not None else x,
            residual_out if residual_out is not None else x, norm_weight, gate_up_weight,
            down_weight_t, partials, hidden, inter, gate_up_weight.stride(0),
            down_weight_t.stride(0), eps, HAS_RESIDUAL=residual is not None,
            BLOCK_F=config.block_f, BLOCK_A=block_a,
            BLOCK_B=triton.next_power_of_2(max(1, hidden - block_a)),
            STAGES=config.num_stages, num_warps=config.num_warps, **options)
    else:
        _fused_mlp_kernel[(programs,)](
            x, residual if residual is not None else x,
            residual_out if residual_out is not None else x, norm_weight, gate_up_weight,
            down_weight_t, partials, hidden, inter, gate_up_weight.stride(0),
            down_weight_t.stride(0), eps, HAS_RESIDUAL=residual is not None,
            BLOCK_F=config.block_f, BLOCK_K=triton.next_power_of_2(hidden),
            STAGES=config.num_stages, PREFETCH=config.prefetch, num_warps=config.num_warps,
            **options)
    out = torch.empty_like(x)
    _sum_partials_kernel[(triton.cdiv(hidden, config.sum_block_k),)](
        partials, out, programs, hidden, BLOCK_P=min(64, triton.next_power_of_2(programs)),
        BLOCK_K=config.sum_block_k, num_warps=4, **options)
    return out, residual_out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs to size the persistent grid by; 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


LAYERS = 28
HIDDEN, INTERMEDIATE = 1536, 8960
EPS = 1e-6
CONFIGS = [FusedMLPConfig(f, w, s, p, split_k=split) for f, w, s, p, split in [
    (4, 8, 4, 1, False), (4, 8, 4, 1, True), (4, 8, 5, 1, True), (4, 8, 6, 1, True),
    (4, 4, 6, 1, True), (2, 8, 8, 1, True), (2, 4, 10, 1, True), (2, 8, 12, 1, True),
    (8, 8, 3, 1, True), (8, 16, 3, 1, True), (4, 16, 5, 1, True), (2, 4, 6, 2, True)]]
"""(intermediate columns per step, warps, pipeline stages, programs per SM, K split in two
tiles). Calls 5-6 of 2026-11-30 (thirty-third session) swept one padded K tile, with and
without the first tile loaded before the PDL wait: the deepest pipeline won (4 columns x 8
warps x 4 stages, 28.8 us per layer against the current 29.9; the prefetch lost everywhere)."""


class Layer:
    def __init__(self, device: torch.device) -> None:
        def weight(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, device=device) / k ** 0.5).to(torch.bfloat16)
        self.o = weight(HIDDEN, HIDDEN)
        self.norm = (1 + 0.1 * torch.randn(HIDDEN, device=device)).to(torch.bfloat16)
        self.gate_up = weight(2 * INTERMEDIATE, HIDDEN)
        self.down = weight(HIDDEN, INTERMEDIATE)
        self.down_t = self.down.t().contiguous()

    def current(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = small_linear(x, self.o, config=default_config(HIDDEN, HIDDEN))[0]
        normed = triton_ops.add_rmsnorm(hidden, residual, self.norm, EPS)
        gate_up = F.linear(normed, self.gate_up)
        return small_linear(gate_up, self.down, gated_input=True,
                            config=choose_config(1, HIDDEN, INTERMEDIATE))[0]

    def fused(self, x: torch.Tensor, residual: torch.Tensor,
              config: FusedMLPConfig) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = small_linear(x, self.o, config=default_config(HIDDEN, HIDDEN))[0]
        out, summed = fused_mlp(hidden, residual, self.norm, EPS, self.gate_up, self.down_t,
                                config)
        assert summed is not None
        return out, summed

    def reference(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = (x.float() @ self.o.float().t()).to(torch.bfloat16)
        summed = (hidden.float() + residual.float()).to(torch.bfloat16)
        normed = F.rms_norm(summed.float(), (HIDDEN,), eps=EPS) * self.norm.float()
        gate_up = normed @ self.gate_up.float().t()
        gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
        return (F.silu(gate) * up) @ self.down.float().t()


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name(device)}")
    torch.manual_seed(0)
    layers = [Layer(device) for _ in range(LAYERS)]
    x0 = torch.randn(1, HIDDEN, device=device).to(torch.bfloat16)
    r0 = torch.randn(1, HIDDEN, device=device).to(torch.bfloat16)
    layer_bytes = sum(t.numel() * t.element_size()
                      for t in (layers[0].o, layers[0].gate_up, layers[0].down))

    # One layer against float32 math (the current path's own error for scale).
    ref = layers[0].reference(x0, r0)
    scale = ref.abs().max().item()
    errors = {"current": (layers[0].current(x0, r0.clone()).float() - ref).abs().max().item()}
    for config in CONFIGS:
        try:
            out = layers[0].fused(x0, r0.clone(), config)[0]
        except Exception as exc:  # noqa: BLE001 - a config beyond the card's resources
            print(f"{config}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        errors[str(config)] = (out.float() - ref).abs().max().item()

    def chain_current() -> None:
        x, residual = x0, r0.clone()
        for layer in layers:
            x = layer.current(x, residual)

    def chain_fused(config: FusedMLPConfig) -> Callable[[], None]:
        def run() -> None:
            x, residual = x0, r0
            for layer in layers:
                x, residual = layer.fused(x, residual, config)
        return run

    variants = {"current": chain_current}
    variants.update({str(c): chain_fused(c) for c in CONFIGS if str(c) in errors})
    replays = {name: graphed(step) for name, step in variants.items()}
    rounds: dict[str, list[float]] = {name: [] for name in replays}
    for _ in range(5):  # interleaved rounds: the card's clocks drift between variants
        for name, replay in replays.items():
            rounds[name].append(cuda_time(replay, repeat=20) / LAYERS * 1e6)
    results = []
    for name, times in rounds.items():
        us = sorted(times)[len(times) // 2]
        results.append({"variant": name, "us_per_layer": us,
                         "tb_per_s": layer_bytes / (us * 1e-6) / 1e12,
                         "max_abs_err": errors[name], "ref_scale": scale})
        print(f"{name:70s} {us:7.2f} us/layer (o + MLP)  {layer_bytes / us / 1e6:5.2f} TB/s  "
              f"max err {errors[name]:.4f} of {scale:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(device), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
