"""A batch-invariant matmul for CUDA: out = x @ weight.T (+ bias), each row's bits independent
of the batch it is computed in.

cuBLAS picks its kernel, tile shape and split-K from the whole problem's shape, so the same
row of x can come out different in its last bits when it runs beside 3 other rows or beside
300. Through 28 layers of bf16 that is enough to flip a greedy token, and it is why greedy
output can change with the step shape: with a tier hit, a request's prompt is computed in
other chunks and beside other requests than without it. Here every output element is the
same chain of MMAs over K, in K's order, whatever M is and whichever rows share its tile:

- the tile (`InvariantTile`) depends only on the weight (N, K, dtype), never on M;
- so does the split of K: a long K (the MLP's down) is cut into `split_k` ranges of whole
  tiles, each summed by its own program into a float32 partial, and the partials are added
  in split order by a second kernel (no atomics), for every M alike;
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
    split_k: int = 1


SPLIT_K_MIN_FEATURES = 4096
"""K from which the invariant matmul splits K (`invariant_tile`)."""
SPLIT_K = 4
"""Splits of such a K. Qwen2.5-1.5B's down (N 1,536, K 8,960) has 24 column tiles: at decode
sizes 24 programs would each stream 1.1 MB of weight; split, 96 stream 0.28 MB. Prefill pays
the partials' round trip (M x N x 4 float32 words written and read)."""


def invariant_tile(out_features: int, in_features: int,
                   dtype: torch.dtype = torch.bfloat16) -> InvariantTile:
    """The tile for a weight of (out_features, in_features) in dtype: a function of the
    weight alone, so every batch of rows takes the same one. 64 x 64 column tiles where 128
    would leave fewer than ~100 programs at decode sizes (the projections of a 1.5B model but
    gate_up and the logits), so small batches still spread the weight read over the SMs; for
    the same reason K is split where it is long and the column tiles few.
    float32 (CUDA-core FMAs, no tensor cores) takes 8 warps: 4 spill a 64 x 128 tile on sm_90."""
    wide = out_features >= 100 * 128
    block_n = 128 if wide else 64
    split_k = SPLIT_K if in_features >= SPLIT_K_MIN_FEATURES and not wide else 1
    return InvariantTile(block_m=64, block_n=block_n, block_k=64,
                         num_warps=8 if dtype == torch.float32 else 4, num_stages=4,
                         split_k=split_k)


@triton.jit(do_not_specialize=["M"])  # one build for every batch size
def _invariant_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk,
                             stride_wn, stride_wk, stride_out, HAS_BIAS: tl.constexpr,
                             IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """out = x @ w.T (+ bias) rounded to out's dtype. With SPLIT_K > 1, out_ptr is a float32
    (SPLIT_K, M, N) workspace: program (i, s) sums K's tiles [s * T, (s + 1) * T)
    (T = cdiv(K tiles, SPLIT_K)) and writes that partial unrounded, without the bias, for
    `_sum_splits_kernel` to add."""
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
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        split_len = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * split_len
        k_hi = tl.minimum(k_lo + split_len, K)
        x_ptrs += k_lo * stride_xk
        w_ptrs += k_lo * stride_wk
    for k0 in range(k_lo, k_hi, BLOCK_K):
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
    if SPLIT_K > 1:
        part = out_ptr + (tl.program_id(1) * M).to(tl.int64) * N
        tl.store(part + rows[:, None].to(tl.int64) * N + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _sum_splits_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_out, HAS_BIAS: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = (((part[0] + part[1]) + ...) + part[SPLIT_K - 1] + bias), rounded once: the
    splits of `_invariant_matmul_kernel` added in split order, element by element."""
    size = M.to(tl.int64) * N
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for split in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + split * size + offs, mask=ok, other=0.0)
    cols = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_out + cols, acc.to(out_ptr.dtype.element_ty),
             mask=ok)


# Eager steps (prefills outside the piecewise graphs) launch it 7 times a layer: through its
# compiled handle, as the attention kernels are (`triton_launch`).
_launch_matmul = CachedKernel(_invariant_matmul_kernel)
_launch_sum_splits = CachedKernel(_sum_splits_kernel)
SUM_BLOCK = 1024
"""Output elements per program of `_sum_splits_kernel` (elementwise: any size gives the same
bits)."""


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
    grid = (triton.cdiv(rows, tile.block_m) * triton.cdiv(out_features, tile.block_n),
            tile.split_k)
    bias_or_any = bias if bias is not None else weight
    # Split: the matmul writes float32 partials (allocated per call: under CUDA-graph capture
    # from the graph's pool, as the attention's split workspace is).
    target = out if tile.split_k == 1 else torch.empty(
        (tile.split_k, rows, out_features), dtype=torch.float32, device=x.device)
    _launch_matmul[grid](
        x, weight, bias_or_any, target, rows, out_features, in_features,
        *x.stride(), *weight.stride(), out.stride(0), HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, UPCAST=_INTERPRETED, BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8, SPLIT_K=tile.split_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    if tile.split_k > 1:
        _launch_sum_splits[(triton.cdiv(rows * out_features, SUM_BLOCK),)](
            target, bias_or_any, out, rows, out_features, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=tile.split_k, BLOCK=SUM_BLOCK, num_warps=4)
    return out
