"""A batch-invariant matmul for CUDA: out = x @ weight.T (+ bias), each row's bits independent
of the batch it is computed in.

cuBLAS picks its kernel, tile shape and split-K from the whole problem's shape, so the same
row of x can come out different in its last bits when it runs beside 3 other rows or beside
300. Through 28 layers of bf16 that is enough to flip a greedy token, and it is why greedy
output can change with the step shape: with a tier hit, a request's prompt is computed in
other chunks and beside other requests than without it. Here every output element is the
same chain of MMAs over K, in K's order, whatever M is and whichever rows share its tile:

- the tile (`InvariantTile`) depends only on the weight (N, K, dtype), never on M;
- no split-K: one program owns an output tile for the whole of K;
- rows past M are loaded as zeros; K's last tile is zero-filled, the same for every M.

This is what vLLM's batch-invariant mode and SGLang's deterministic inference do for their
GEMMs (there with persistent kernels). It costs speed where cuBLAS would have chosen better
for the shape: decode batches read the weight through 64-row tiles, and prefill runs with
mid-size tiles. `layers.invariant_linear` runs it for every projection and the logits on
CUDA when the engine runs with `--batch-invariant`. Imported only on CUDA (or under Triton's
interpreter in tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvtier.attention.triton_kernels import interpreted_dot
from kvtier.triton_launch import CachedKernel

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class InvariantTile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def invariant_tile(out_features: int, in_features: int,
                   dtype: torch.dtype = torch.bfloat16) -> InvariantTile:
    """The tile for a weight of (out_features, in_features) in dtype: a function of the
    weight alone, so every batch of rows takes the same one. 64 x 64 column tiles where 128
    would leave fewer than ~100 programs at decode sizes (the projections of a 1.5B model but
    gate_up and the logits), so small batches still spread the weight read over the SMs.
    float32 (CUDA-core FMAs, no tensor cores) takes 8 warps: 4 spill a 64 x 128 tile on sm_90."""
    del in_features  # K is walked whole by every tile
    block_n = 128 if out_features >= 100 * 128 else 64
    return InvariantTile(block_m=64, block_n=block_n, block_k=64,
                         num_warps=8 if dtype == torch.float32 else 4, num_stages=4)


@triton.jit(do_not_specialize=["M"])  # one build for every batch size
def _invariant_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk,
                             stride_wn, stride_wk, stride_out, HAS_BIAS: tl.constexpr,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # Grouped order (GROUP_M row tiles walk the column tiles together) for L2 reuse of x's
    # rows; the order of programs does not change any output element's arithmetic.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter: see `triton_kernels.interpreted_dot`
            acc += interpreted_dot(a, b)
        elif IEEE:  # float32 weights: full-precision products, not TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Eager steps (prefills outside the piecewise graphs) launch it 7 times a layer: through its
# compiled handle, as the attention kernels are (`triton_launch`).
_launch_matmul = CachedKernel(_invariant_matmul_kernel)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T + bias (N,), into out (M, N) (rows contiguous) when given;
    x and weight in any strides (contiguous along K is the fast case). Accumulates in float32,
    rounds once to x's dtype (the bias added before the rounding, as cuBLAS's addmm epilogue
    adds it)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be "
                         "(M, K) and (N, K)")
    if x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} must share a dtype")
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({out_features},)")
    if out is None:
        out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    elif out.shape != (rows, out_features) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be ({rows}, {out_features}) {x.dtype} with contiguous rows")
    if rows == 0:
        return out
    tile = invariant_tile(out_features, in_features, weight.dtype)
    grid = (triton.cdiv(rows, tile.block_m) * triton.cdiv(out_features, tile.block_n),)
    _launch_matmul[grid](
        x, weight, bias if bias is not None else weight, out, rows, out_features, in_features,
        *x.stride(), *weight.stride(), out.stride(0), HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, UPCAST=_INTERPRETED, BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8, num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    return out
