"""Linear layers for a handful of rows (decode at batch 1-2) with their neighbours fused.

At decode batch sizes a projection reads its whole weight to produce a few rows: it is bound
by the weight read, and for the small projections of a 1.5B model (3-6 MB) by launch and
ramp-up latency. cuBLAS runs `o` and `qkv` at 0.7-0.9 TB/s there, and the residual add +
RMSNorm before `qkv` is one more launch. `small_linear` folds them in:

- prologue (optional): h = x + residual (written once, to `residual_out`); the RMSNorm's
  weight multiplies h on the way in and its 1/rms scales the sums at the end, so the norm costs
  no pass of its own (its statistic accumulates in the same loop). Or, for the MLP's down,
  silu(gate) * up of the gate_up projection's output, computed as it is read;
- body: a GEMV on the CUDA cores (no tensor-core tile to pad a few rows to 16), in one of two
  kernels. The register kernel: each program owns BLOCK_N output columns and streams their
  weight rows over K in 16-byte loads into registers, with many programs per SM so the loads
  of some hide the latency of others (qkv, o). The streamed kernel (`programs_per_sm` > 0):
  persistent programs loop over column tiles and K chunks, Triton pipelining the weight
  chunks through shared memory (cp.async), several deep (the MLP's down);
- epilogue: bias, then silu(gate) * up for a [gate | up] weight (both halves in one
  program), or the rotary embedding of qkv's q and k heads (a program owns rotate-half pairs
  of columns, so the rotary kernel's launch goes too) and optionally k and v stored in the
  paged KV cache (measured slower than the KV-write kernel under PDL, so off by default).

Launched with programmatic dependent launch (`kvtier.triton_pdl`) on Hopper, each program of
the register kernel requests its first weight tile before waiting for the previous kernel, so
the weight stream starts while that kernel finishes (the streamed kernel's pipeline prologue
reads x too, so it waits first). Which projections the model runs here is its choice
(`llama.SMALL_BATCH_FUSIONS`, from `scripts/tune_small_linear.py` and the decode A/B).

Numerics: float32 statistics and accumulation as in `triton_ops`; the residual sum is rounded
to the activation dtype as torch's add rounds it. The normed activation is not rounded to the
dtype before the projection (the unfused path rounds it twice), so results differ from the
unfused layers by bf16 rounding, as any change of GEMM kernel does.
Imported only on CUDA (or under Triton's interpreter in tests).
"""

from __future__ import annotations

import functools
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
    programs_per_sm: int = 0
    """0: one program per column tile, its weight rows loaded into registers (the qkv
    epilogue needs this kernel). > 0: the streamed kernel, this many
    persistent programs per SM, each looping over column tiles with the weight chunks
    software-pipelined through shared memory num_stages deep (for the MLP's long weights)."""


def default_config(out_features: int, in_features: int) -> SmallLinearConfig:
    """The register kernel's config. Wide K tiles and narrow column tiles: bytes in flight
    come from long 16-byte load streams and from many programs per SM (its loop is a plain
    `range`, not pipelined by Triton; the kernel keeps the next weight tile in flight in
    registers itself). K up to 2,048 is
    one tile (4 columns per program); longer K streams 1,024-wide tiles, two in registers at
    a time, over 2 columns. On an H200 at 1 row (`scripts/tune_small_linear.py`, 28 layers
    per graph, PDL): qkv + norm + bias 3.95 us, o 2.66, down 10.27 (cuBLAS: 6.5, 6.7, 11.2)."""
    del out_features  # the column tile serves the shapes we measured
    if in_features <= 2048:
        return SmallLinearConfig(block_n=4, block_k=2048, num_warps=4, num_stages=1)
    return SmallLinearConfig(block_n=2, block_k=1024, num_warps=4, num_stages=1)


def choose_config(rows: int, out_features: int,
                  in_features: int) -> SmallLinearConfig | None:
    """The config to run a projection of `rows` rows with, or None where cuBLAS is faster
    (beyond MAX_ROWS; gate_up at 2 rows). The MLP's long weights take the streamed kernel:
    on an H200 at 1 row (`scripts/tune_small_linear.py`, 28 layers per graph, PDL), down
    8.5 us (cuBLAS 11.3) and gate_up with its norm and SiLU 18.0-18.4 (cuBLAS with the
    separate kernels 18.4-18.7); at 2 rows down 9.4 (11.6) and gate_up 21.7 (19.2). Which
    projections the model runs here is its choice (`llama.SMALL_BATCH_FUSIONS`)."""
    if rows > MAX_ROWS:
        return None
    if in_features > 2048:  # the MLP's down
        if rows == 1:
            return SmallLinearConfig(4, 1024, 4, 3, programs_per_sm=4)
        return SmallLinearConfig(4, 512, 4, 4, programs_per_sm=4)
    if out_features > 8192:  # the MLP's gate_up ([gate | up] rows)
        # Six stages: shared memory for no more than the 2 programs per SM the grid has.
        # Launched early under PDL, a persistent grid lands where SMs have room, and with 4
        # stages (4 would fit) the programs stacked unevenly: in the batch-1 decode graph
        # 1.53 ms against 1.37 with 6 (cuBLAS's gate_up, still the model's default: 1.29).
        return SmallLinearConfig(2, 2048, 4, 6, programs_per_sm=2) if rows == 1 else None
    return default_config(out_features, in_features)


@triton.jit
def _small_linear_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, b_ptr, out_ptr,
                         pos_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
                         M, N, K, stride_x, stride_res, stride_res_out, stride_w, stride_out,
                         stride_table, q_size, kv_size, stride_kv, stride_block, stride_slot,
                         stride_head, eps, NORM: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         GATED: tl.constexpr, GATED_INPUT: tl.constexpr,
                         ROTARY: tl.constexpr, WRITE_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, EVEN_K: tl.constexpr,
                         ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rotary_programs = (q_size + kv_size) // BLOCK_N
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
        # The next weight tile is in flight while this one is summed (registers, two deep).
        w_next = w
        w_up_next = w_up
        if not ONE_TILE:
            next_ks = ks + BLOCK_K
            next_ok = col_ok[:, None] & (next_ks < K)[None, :]
            w_next = tl.load(w_rows + next_ks[None, :], mask=next_ok, other=0.0)
            if GATED:
                w_up_next = tl.load(w_up_rows + next_ks[None, :], mask=next_ok, other=0.0)
        af = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, row_ok, ks, k_ok, K,
                               stride_x, stride_res, stride_res_out, pid == 0, HAS_RESIDUAL,
                               GATED_INPUT)
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
    if WRITE_KV:  # k and v of each row into the paged cache at its slot (< 0: padding)
        is_v = cols >= q_size + kv_size
        kv_col = cols - q_size - tl.where(is_v, kv_size, 0)
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
        slot_offset = slot // BLOCK_SIZE * stride_block + slot % BLOCK_SIZE * stride_slot
        col_offset = (is_v.to(tl.int64) * stride_kv + kv_col // HEAD_DIM * stride_head
                      + kv_col % HEAD_DIM)
        dst = cache_ptr + slot_offset[:, None] + col_offset[None, :]
        kv_mask = (slot >= 0)[:, None] & (col_ok & (cols >= q_size))[None, :]
        tl.store(dst, result, mask=kv_mask)
    if GATED:
        result = _silu_and_mul(result, out_up.to(dtype))
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], result, mask=out_mask)


@triton.jit
def _streamed_linear_kernel(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, b_ptr, out_ptr,
                            M, N, K, stride_x, stride_res, stride_res_out, stride_w,
                            stride_out, eps, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                            GATED_INPUT: tl.constexpr, K_CHUNKS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            STAGES: tl.constexpr, PDL: tl.constexpr):
    """small_linear for long weights: persistent programs, each taking every programs-th
    column tile, walk one flat loop over (tile, K chunk). Triton software-pipelines its loads
    (cp.async into shared memory, STAGES deep), so each program keeps several chunks in
    flight with few registers, across tile boundaries too. The products accumulate
    elementwise and are summed once per tile: no cross-thread reduction per chunk."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    my_tiles = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs)  # the grid has <= tiles programs
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = w_ptr.dtype.element_ty
    # The loop's prologue already reads x: nothing is requested before the wait.
    await_previous_kernel(PDL)

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    x_once = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    if K_CHUNKS == 1:  # K in one chunk: x summed with its residual and normed once, here
        k_ok = offs_k < K
        x_once = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, row_ok, offs_k, k_ok, K,
                                   stride_x, stride_res, stride_res_out, pid == 0,
                                   HAS_RESIDUAL, GATED_INPUT)
        if NORM:
            rstd = tl.rsqrt(tl.sum(x_once * x_once, axis=1) / K + eps)
            norm_w = tl.load(norm_w_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x_once *= norm_w[None, :] * rstd[:, None]
    for i in tl.range(0, my_tiles * K_CHUNKS, num_stages=STAGES):
        tile = pid + (i // K_CHUNKS) * programs
        chunk = i % K_CHUNKS
        cols = tile * BLOCK_N + offs_n
        col_ok = cols < N
        ks = chunk * BLOCK_K + offs_k
        k_ok = ks < K  # K is a multiple of 16: the masks keep 16-byte vectors
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        w_up = w
        if GATED:
            w_up = tl.load(w_ptr + (cols + N)[:, None] * stride_w + ks[None, :], mask=w_mask,
                           other=0.0)
        if K_CHUNKS == 1:
            af = x_once
        else:
            # x's chunk (and its residual's, the norm weight's) is read again for every tile:
            # from L1/L2, a fraction of the weight bytes when the tile has enough columns.
            af = _projection_input(x_ptr, res_ptr, res_out_ptr, rows, row_ok, ks, k_ok, K,
                                   stride_x, stride_res, stride_res_out,
                                   pid == 0 and i < K_CHUNKS, HAS_RESIDUAL, GATED_INPUT)
            if NORM:
                squares += af * af
                af = af * tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc += w.to(tl.float32)[None, :, :] * af[:, None, :]
        if GATED:
            acc_up += w_up.to(tl.float32)[None, :, :] * af[:, None, :]
        if chunk == K_CHUNKS - 1:  # the tile's last chunk: its epilogue, as the other kernel's
            out = tl.sum(acc, axis=2)
            out_up = tl.sum(acc_up, axis=2)
            if NORM and K_CHUNKS > 1:
                rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)
                out = out * rstd[:, None]
                out_up = out_up * rstd[:, None]
            if HAS_BIAS:
                out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            result = out.to(dtype)
            if GATED:
                result = _silu_and_mul(result, out_up.to(dtype))
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], result,
                     mask=row_ok[:, None] & col_ok[None, :])
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)


@triton.jit
def _projection_input(x_ptr, res_ptr, res_out_ptr, rows, row_ok, ks, k_ok, K, stride_x,
                      stride_res, stride_res_out, write_residual, HAS_RESIDUAL: tl.constexpr,
                      GATED_INPUT: tl.constexpr):
    """Columns ks (those with k_ok) of the projection's input before its norm, float32, for
    both kernels: x, or silu(gate) * up of x = [gate | up] (K columns each), + residual (that
    sum rounded to the dtype and written to res_out when write_residual)."""
    mask = row_ok[:, None] & k_ok[None, :]
    a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
    if GATED_INPUT:
        up = tl.load(x_ptr + rows[:, None] * stride_x + K + ks[None, :], mask=mask, other=0.0)
        a = _silu_and_mul(a, up)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + ks[None, :], mask=mask, other=0.0)
        a = (a.to(tl.float32) + r.to(tl.float32)).to(a.dtype)
        if write_residual:
            tl.store(res_out_ptr + rows[:, None] * stride_res_out + ks[None, :], a, mask=mask)
    return a.to(tl.float32)


@triton.jit
def _silu_and_mul(gate, up):
    """silu(gate) * up of two tensors in the activation dtype, rounded as
    `triton_ops.silu_and_mul` rounds: silu(gate) to the dtype, then the product."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@dataclass(frozen=True)
class QKVEpilogue:
    """What follows a fused qkv projection ([q | k | v] heads of head_dim), row r being the
    token at positions[r]: the rotate-half rotary embedding of q and k (what
    `triton_ops.rotary_inplace` does after the projection, without its launch), and, with a
    kv_cache, k and v stored at slot_mapping[r] (what the attention backend's KV write does)."""
    positions: torch.Tensor
    """(rows,) integer positions."""
    cos: torch.Tensor
    """(max_positions, head_dim) float32 table, as `RotaryEmbedding` builds it."""
    sin: torch.Tensor
    q_size: int
    kv_size: int
    head_dim: int
    kv_cache: torch.Tensor | None = None
    """(2, num_blocks, block_size, num_kv_heads, head_dim), the layout of `attention.base`."""
    slot_mapping: torch.Tensor | None = None
    """(rows,) int64 slots; a negative slot (padding) is not written."""


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, gated: bool = False,
                 gated_input: bool = False, qkv: QKVEpilogue | None = None,
                 out: torch.Tensor | None = None, config: SmallLinearConfig | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, residual_out) for x (M <= MAX_ROWS, K) and weight (N, K), nn.Linear's layout.

    norm_weight: apply RMSNorm(x + residual) (or of x alone) before the projection; with a
    residual, residual_out is the new tensor x + residual (the residual stream's next value),
    else None. gated: weight is [gate | up] (2F, K) and out is silu(x @ gate.T) * (x @ up.T).
    gated_input: x is [gate | up] (M, 2K), and the projection's input is silu(gate) * up (the
    MLP's down after a gate_up projection; no norm or residual then).
    qkv: the output is a fused qkv projection: rotate its q and k heads and, with a cache,
    store k and v (not with `gated`).
    out: where to write (M, N) (rows contiguous), else a new tensor.
    """
    rows, in_features = x.shape
    if gated_input:
        if norm_weight is not None or residual is not None:
            raise ValueError("a gated input takes no norm or residual")
        in_features //= 2
    if gated and qkv is not None:
        raise ValueError("a gated projection takes no qkv epilogue")
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
    if config.programs_per_sm:
        if qkv is not None:
            raise ValueError("the streamed kernel takes no qkv epilogue")
        _launch_streamed(x, weight, bias, norm_weight, eps, residual, residual_out, gated,
                         gated_input, out, config)
        return out, residual_out
    if qkv is not None:
        _check_qkv(qkv, x, width, config)
    cache = qkv.kv_cache if qkv is not None else None
    has_residual = residual is not None
    _small_linear_kernel[(triton.cdiv(width, config.block_n),)](
        x, residual if has_residual else x, residual_out if has_residual else x,
        norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out,
        qkv.positions if qkv else x, qkv.cos if qkv else x, qkv.sin if qkv else x,
        cache if cache is not None else x, qkv.slot_mapping if cache is not None else x,
        rows, width, in_features, x.stride(0), residual.stride(0) if has_residual else 0,
        residual_out.stride(0) if residual_out is not None else 0, weight.stride(0),
        out.stride(0), qkv.cos.stride(0) if qkv else 0, qkv.q_size if qkv else 0,
        qkv.kv_size if qkv else 0, *(cache.stride()[:4] if cache is not None else (0,) * 4),
        eps, NORM=norm_weight is not None, HAS_RESIDUAL=has_residual,
        HAS_BIAS=bias is not None, GATED=gated, GATED_INPUT=gated_input,
        ROTARY=qkv is not None, WRITE_KV=cache is not None,
        HEAD_DIM=qkv.head_dim if qkv else 0,
        BLOCK_SIZE=cache.shape[2] if cache is not None else 1,
        EVEN_K=in_features % config.block_k == 0,
        ONE_TILE=in_features <= config.block_k, BLOCK_M=triton.next_power_of_2(rows),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, **launch_options(x))
    return out, residual_out


def _launch_streamed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None, residual_out: torch.Tensor | None,
                     gated: bool, gated_input: bool, out: torch.Tensor,
                     config: SmallLinearConfig) -> None:
    rows, in_features = x.shape[0], weight.shape[1]
    width = out.shape[1]
    tiles = triton.cdiv(width, config.block_n)
    programs = min(tiles, _multiprocessors(x.device) * config.programs_per_sm)
    has_residual = residual is not None
    _streamed_linear_kernel[(programs,)](
        x, residual if has_residual else x, residual_out if has_residual else x,
        norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out,
        rows, width, in_features, x.stride(0), residual.stride(0) if has_residual else 0,
        residual_out.stride(0) if residual_out is not None else 0, weight.stride(0),
        out.stride(0), eps, NORM=norm_weight is not None, HAS_RESIDUAL=has_residual,
        HAS_BIAS=bias is not None, GATED=gated, GATED_INPUT=gated_input,
        K_CHUNKS=triton.cdiv(in_features, config.block_k),
        BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, STAGES=config.num_stages, num_warps=config.num_warps,
        **launch_options(x))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs to size the persistent grid by; 4 under the interpreter (several programs, each
    with several tiles, as on a GPU)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_qkv(qkv: QKVEpilogue, x: torch.Tensor, width: int,
               config: SmallLinearConfig) -> None:
    """Refuse an epilogue whose shapes do not fit the projection (the kernel would index past
    the tables or the cache)."""
    rows, head_dim = x.shape[0], qkv.head_dim
    if head_dim % config.block_n or head_dim % 2:
        raise ValueError(f"qkv head_dim {head_dim} must be a multiple of the column tile "
                         f"{config.block_n}")
    if qkv.q_size % head_dim or qkv.kv_size % head_dim or qkv.q_size <= 0 \
            or qkv.kv_size <= 0 or qkv.q_size + 2 * qkv.kv_size != width:
        raise ValueError(f"qkv sizes {qkv.q_size} + 2 x {qkv.kv_size} must be whole heads of "
                         f"{head_dim} making the {width} outputs")
    if qkv.positions.shape != (rows,):
        raise ValueError(f"qkv positions {tuple(qkv.positions.shape)} must be ({rows},)")
    for table in (qkv.cos, qkv.sin):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype != torch.float32 \
                or table.stride(1) != 1 or table.stride() != qkv.cos.stride():
            raise ValueError(f"rotary tables must be float32 (positions, {head_dim}), rows "
                             f"contiguous, got {tuple(table.shape)} {table.dtype}")
    cache = qkv.kv_cache
    if cache is None:
        return
    if (cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[3:] != (
            qkv.kv_size // head_dim, head_dim) or cache.stride(-1) != 1
            or cache.dtype != x.dtype):
        raise ValueError(f"kv_cache {tuple(cache.shape)} {cache.dtype} must be (2, blocks, "
                         f"block_size, {qkv.kv_size // head_dim}, {head_dim}) {x.dtype}")
    if qkv.slot_mapping is None or qkv.slot_mapping.shape != (rows,):
        raise ValueError(f"a kv_cache needs slot_mapping of ({rows},)")
