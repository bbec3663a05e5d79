"""Linear layers for a handful of rows (decode at batch 1-2) with their neighbours fused.

At decode batch sizes a projection reads its whole weight to produce a few rows: it is bound
by the weight read, and for the small projections of a 1.5B model (3-6 MB) by launch and
ramp-up latency. cuBLAS runs `o` and `qkv` at 0.7-0.9 TB/s there, and the residual add +
RMSNorm before `qkv` is one more launch. `small_linear` folds them in:

- prologue (optional): h = x + residual (written once, to `residual_out`); the RMSNorm's
  weight multiplies h on the way in and its 1/rms scales the sums at the end, so the norm costs
  no pass of its own (its statistic accumulates in the same loop). Or, for the MLP's down,
  silu(gate) * up of the gate_up projection's output, computed as it is read;
- body: a GEMV on the CUDA cores (no tensor-core tile to pad a few rows to 16): each program
  owns BLOCK_N output columns and streams their weight rows over K in 16-byte loads, with many
  programs per SM so the loads of some hide the latency of others;
- epilogue: bias, then silu(gate) * up for a [gate | up] weight (both halves in one
  program), or the rotary embedding of qkv's q and k heads (a program owns rotate-half pairs
  of columns, so the rotary kernel's launch goes too).

Launched with programmatic dependent launch (`kvtier.triton_pdl`) on Hopper, each program
requests its first weight tile before waiting for the previous kernel, so the weight stream
starts while that kernel finishes. Which projections the model runs here is its choice
(`llama.SMALL_LINEAR_PROJECTIONS`, from `scripts/tune_small_linear.py` and the decode A/B).

Numerics: float32 statistics and accumulation as in `triton_ops`; the residual sum is rounded
to the activation dtype as torch's add rounds it. The normed activation is not rounded to the
dtype before the projection (the unfused path rounds it twice), so results differ from the
unfused layers by bf16 rounding, as any change of GEMM kernel does.
Imported only on CUDA (or under Triton's interpreter in tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvtier.triton_pdl import await_previous_kernel, launch_options

MAX_ROWS = 2
"""Rows `small_linear` takes: decode at batch 1-2. Each row costs registers, and at 4 rows
cuBLAS's tensor-core tiles were faster already (qkv 10.0 us against 7.5 on an H200)."""


@dataclass(frozen=True)
class SmallLinearConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(out_features: int, in_features: int) -> SmallLinearConfig:
    """Wide K tiles and narrow column tiles: bytes in flight come from long 16-byte load
    streams and from many programs per SM (the loads feed no dot, so Triton does not
    pipeline them; the kernel keeps the next weight tile in flight itself). K up to 2,048 is
    one tile (4 columns per program); longer K streams 1,024-wide tiles, two in registers at
    a time, over 2 columns. On an H200 at 1 row (`scripts/tune_small_linear.py`, 28 layers
    per graph, PDL): qkv + norm + bias 3.95 us, o 2.66, down 10.27 (cuBLAS: 6.5, 6.7, 11.2)."""
    del out_features  # the column tile serves the shapes we measured
    if in_features <= 2048:
        return SmallLinearConfig(block_n=4, block_k=2048, num_warps=4, num_stages=1)
    return SmallLinearConfig(block_n=2, block_k=1024, num_warps=4, num_stages=1)


def choose_config(rows: int, out_features: int,
                  in_features: int) -> SmallLinearConfig | None:
    """The config to run a projection of `rows` rows with, or None where cuBLAS is faster:
    beyond MAX_ROWS, and for long K (the MLP's down, 8,960) at 2 rows (12.9 us against 11.7).
    Which projections the model runs here is its choice (`llama.SMALL_LINEAR_PROJECTIONS`)."""
    if rows > MAX_ROWS or (in_features > 2048 and rows > 1):
        return None
    return default_config(out_features, in_features)


@triton.jit
def _small_linear_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, b_ptr, out_ptr,
                         pos_ptr, cos_ptr, sin_ptr,
                         M, N, K, stride_x, stride_res, stride_res_out, stride_w, stride_out,
                         stride_table, rotary_programs, eps, NORM: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         GATED: tl.constexpr, GATED_INPUT: tl.constexpr,
                         ROTARY: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_K: tl.constexpr,
                         ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROTARY:
        # The first rotary_programs programs own rotate-half pairs: columns d .. d + P - 1 of
        # a head and their partners HEAD_DIM / 2 further (P = BLOCK_N / 2), so the epilogue
        # can rotate them; the weight rows stay whole 16-byte streams along K.
        PAIRS: tl.constexpr = BLOCK_N // 2
        HALF: tl.constexpr = HEAD_DIM // 2
        j = tl.arange(0, BLOCK_N)
        head = pid // (HALF // PAIRS)
        first = (pid % (HALF // PAIRS)) * PAIRS
        paired = head * HEAD_DIM + first + j % PAIRS + (j // PAIRS) * HALF
        cols = tl.where(pid < rotary_programs, paired, cols)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    dtype = w_ptr.dtype.element_ty
    w_rows = w_ptr + cols[:, None] * stride_w
    w_up_rows = w_ptr + (cols + N)[:, None] * stride_w

    # The first weight tile is loaded before waiting for the previous kernel (weights are
    # written by no kernel), so under PDL the weight stream starts while that kernel finishes.
    first_ok = col_ok[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_rows + offs_k[None, :], mask=first_ok, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(w_up_rows + offs_k[None, :], mask=first_ok, other=0.0)
    await_previous_kernel(PDL)

    # Summed over K every step: a [rows, columns, K] accumulator would not fit in registers.
    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    out_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Tiles start on BLOCK_K and K is a multiple of 16 (Triton specialises on it), so
        # the K masks are constant over 8 elements and the loads stay 16-byte vectors.
        ks = tl.multiple_of(k0, BLOCK_K) + offs_k
        k_ok = ks < K
        if EVEN_K:  # no mask along K: the loads vectorise to 16 bytes
            k_ok = tl.full([BLOCK_K], 1, tl.int1)
        mask = row_ok[:, None] & k_ok[None, :]
        # The next weight tile is in flight while this one is summed (registers, two deep).
        w_next = w
        w_up_next = w_up
        if not ONE_TILE:
            next_ks = ks + BLOCK_K
            next_ok = col_ok[:, None] & (next_ks < K)[None, :]
            w_next = tl.load(w_rows + next_ks[None, :], mask=next_ok, other=0.0)
            if GATED:
                w_up_next = tl.load(w_up_rows + next_ks[None, :], mask=next_ok, other=0.0)
        a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
        if GATED_INPUT:  # x is [gate | up]: a = silu(gate) * up, rounded as silu_and_mul
            up = tl.load(x_ptr + rows[:, None] * stride_x + K + ks[None, :], mask=mask,
                         other=0.0)
            gate = a.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            a = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_res + ks[None, :], mask=mask,
                        other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(res_out_ptr + rows[:, None] * stride_res_out + ks[None, :], a,
                         mask=mask)
        af = a.to(tl.float32)
        if NORM:
            squares += tl.sum(af * af, axis=1)
            af = af * tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        out += tl.sum(w.to(tl.float32)[None, :, :] * af[:, None, :], axis=2)
        if GATED:
            out_up += tl.sum(w_up.to(tl.float32)[None, :, :] * af[:, None, :], axis=2)
        w = w_next
        w_up = w_up_next

    if NORM:
        rstd = tl.rsqrt(squares / K + eps)
        out = out * rstd[:, None]
        out_up = out_up * rstd[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    result = out.to(dtype)
    if ROTARY:  # as `triton_ops.rotary_inplace` rotates the rounded projection
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        dims = first + tl.arange(0, PAIRS)
        table = pos[:, None] * stride_table + dims[None, :]
        cos = tl.load(cos_ptr + table)
        sin = tl.load(sin_ptr + table)
        halves = tl.permute(tl.reshape(result.to(tl.float32), [BLOCK_M, 2, PAIRS]), (0, 2, 1))
        x1, x2 = tl.split(halves)
        rotated = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        rotated = tl.reshape(tl.permute(rotated, (0, 2, 1)), [BLOCK_M, BLOCK_N]).to(dtype)
        result = tl.where(pid < rotary_programs, rotated, result)
    if GATED:  # as silu_and_mul rounds: gate and up in dtype, silu(gate) in dtype
        gate = result.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        result = (act.to(tl.float32) * out_up.to(dtype).to(tl.float32)).to(dtype)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], result, mask=out_mask)


@dataclass(frozen=True)
class RotaryEpilogue:
    """Rotate-half rotary embedding for the first `columns` output columns (the q and k heads
    of a fused qkv projection), row r at positions[r]: what `triton_ops.rotary_inplace` does
    after the projection, without its launch."""
    positions: torch.Tensor
    """(rows,) integer positions."""
    cos: torch.Tensor
    """(max_positions, head_dim) float32 table, as `RotaryEmbedding` builds it."""
    sin: torch.Tensor
    columns: int
    head_dim: int


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, gated: bool = False,
                 gated_input: bool = False, rotary: RotaryEpilogue | None = None,
                 out: torch.Tensor | None = None, config: SmallLinearConfig | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, residual_out) for x (M <= MAX_ROWS, K) and weight (N, K), nn.Linear's layout.

    norm_weight: apply RMSNorm(x + residual) (or of x alone) before the projection; with a
    residual, residual_out is the new tensor x + residual (the residual stream's next value),
    else None. gated: weight is [gate | up] (2F, K) and out is silu(x @ gate.T) * (x @ up.T).
    gated_input: x is [gate | up] (M, 2K), and the projection's input is silu(gate) * up (the
    MLP's down after a gate_up projection; no norm or residual then).
    rotary: rotate the output's first rotary.columns columns (not with `gated`).
    out: where to write (M, N) (rows contiguous), else a new tensor.
    """
    rows, in_features = x.shape
    if gated_input:
        if norm_weight is not None or residual is not None:
            raise ValueError("a gated input takes no norm or residual")
        in_features //= 2
    if gated and rotary is not None:
        raise ValueError("a gated projection takes no rotary")
    if rows > MAX_ROWS:
        raise ValueError(f"small_linear takes at most {MAX_ROWS} rows, got {rows}")
    if gated and bias is not None:
        raise ValueError("a gated projection takes no bias")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous along K")
    if weight.shape[1] != in_features or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not take x "
                         f"{tuple(x.shape)} {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if norm_weight is not None and norm_weight.shape != (in_features,):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} must be ({in_features},)")
    width = weight.shape[0] // 2 if gated else weight.shape[0]
    if out is None:
        out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    elif out.shape != (rows, width) or out.stride(1) != 1:
        raise ValueError(f"out must be ({rows}, {width}) with contiguous rows")
    residual_out = None
    if residual is not None:
        if norm_weight is None:
            raise ValueError("a residual needs the norm it feeds")
        residual_out = torch.empty_like(x)
    config = config or default_config(width, in_features)
    rotary_programs = _check_rotary(rotary, rows, width, config) if rotary else 0
    has_residual = residual is not None
    _small_linear_kernel[(triton.cdiv(width, config.block_n),)](
        x, residual if has_residual else x, residual_out if has_residual else x,
        norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out,
        rotary.positions if rotary else x, rotary.cos if rotary else x,
        rotary.sin if rotary else x, rows, width, in_features, x.stride(0),
        residual.stride(0) if has_residual else 0,
        residual_out.stride(0) if residual_out is not None else 0, weight.stride(0),
        out.stride(0), rotary.cos.stride(0) if rotary else 0, rotary_programs, eps,
        NORM=norm_weight is not None, HAS_RESIDUAL=has_residual,
        HAS_BIAS=bias is not None, GATED=gated, GATED_INPUT=gated_input,
        ROTARY=rotary is not None, HEAD_DIM=rotary.head_dim if rotary else 0,
        EVEN_K=in_features % config.block_k == 0,
        ONE_TILE=in_features <= config.block_k, BLOCK_M=triton.next_power_of_2(rows),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, **launch_options(x))
    return out, residual_out


def _check_rotary(rotary: RotaryEpilogue, rows: int, width: int,
                  config: SmallLinearConfig) -> int:
    """The number of programs that rotate (each owns block_n / 2 rotate-half pairs)."""
    head_dim, columns = rotary.head_dim, rotary.columns
    if head_dim % config.block_n or head_dim % 2:
        raise ValueError(f"rotary head_dim {head_dim} must be a multiple of the column tile "
                         f"{config.block_n}")
    if columns % head_dim or not 0 < columns <= width:
        raise ValueError(f"rotary columns {columns} must be whole heads of {head_dim} within "
                         f"the {width} outputs")
    if rotary.positions.shape != (rows,):
        raise ValueError(f"rotary positions {tuple(rotary.positions.shape)} must be ({rows},)")
    for table in (rotary.cos, rotary.sin):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype != torch.float32 \
                or table.stride(1) != 1 or table.stride() != rotary.cos.stride():
            raise ValueError(f"rotary tables must be float32 (positions, {head_dim}), rows "
                             f"contiguous, got {tuple(table.shape)} {table.dtype}")
    return columns // config.block_n
