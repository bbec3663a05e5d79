"""Fused elementwise kernels for CUDA: residual add + RMSNorm, SiLU-and-mul, rotary in place.

Each replaces a chain of 5-10 small torch kernels per call, which at decode batch sizes cost
more in launches than in memory traffic, and at prefill sizes re-read the activations several
times. Numerics follow HF's: the residual sum is rounded to the activation dtype before the norm
(as HF's separate add does), statistics are in float32. Imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.triton_pdl import await_previous_kernel, launch_options


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_res, stride_out,
                        eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: no kernel writes it
    await_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    tl.store(out_ptr + row * stride_out + cols, (normed.to(tl.float32) * weight.to(tl.float32))
             .to(x.dtype), mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
    """norm(x + residual) with `residual` updated in place to x + residual (or norm(x))."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(cols)
    _add_rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, cols, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8,
        **launch_options(x))
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32))
             .to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2F) [gate | up] -> (T, F) silu(gate) * up."""
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                   out.stride(0), BLOCK=block, num_warps=4,
                                                   **launch_options(gate_up))
    return out


@triton.jit
def _rotate_heads(base, stride_head, cos, sin, NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
                  HALF: tl.constexpr):
    """Rotate one token's NUM_HEADS heads at `base` in place, all heads' loads at once."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    mask = (heads < NUM_HEADS)[:, None]
    ptrs = base + heads[:, None] * stride_head + d[None, :]
    x1 = tl.load(ptrs, mask=mask)
    x2 = tl.load(ptrs + HALF, mask=mask)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptrs, (f1 * cos[None, :] - f2 * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (f2 * cos[None, :] + f1 * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_q_tok, stride_q_head,
                   stride_k_tok, stride_k_head, stride_table, NUM_Q_HEADS: tl.constexpr,
                   NUM_K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                   HALF: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_table + d)
    sin = tl.load(sin_ptr + pos * stride_table + d)
    _rotate_heads(q_ptr + token * stride_q_tok, stride_q_head, cos, sin, NUM_Q_HEADS,
                  BLOCK_QH, HALF)
    _rotate_heads(k_ptr + token * stride_k_tok, stride_k_head, cos, sin, NUM_K_HEADS,
                  BLOCK_KH, HALF)


def rotary_inplace(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate query (T, H, D) and key (T, KVH, D) in place (rotate-half layout); cos/sin are
    the float32 tables (max_positions, D)."""
    tokens, num_heads, head_dim = query.shape
    _rotary_kernel[(tokens,)](
        query, key, cos, sin, positions, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), cos.stride(0), NUM_Q_HEADS=num_heads, NUM_K_HEADS=key.shape[1],
        BLOCK_QH=triton.next_power_of_2(num_heads), BLOCK_KH=triton.next_power_of_2(key.shape[1]),
        HALF=head_dim // 2, num_warps=4, **launch_options(query))
