"""Building blocks of the decoder: RMSNorm, rotary embedding, gated MLP.

Numerics follow HF transformers' Llama/Qwen2 code (norms in float32, rotate-half rotary with
float32 cos/sin tables), so logits match within float32 rounding. On CUDA each block runs as one
fused Triton kernel (`triton_ops`); elsewhere as the plain torch reference below.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.model import onednn


@cache
def _triton_module(name: str) -> ModuleType | None:
    """kvtier.model.<name> (a module of Triton kernels), or None where Triton is missing."""
    try:
        return importlib.import_module(f"kvtier.model.{name}")
    except ImportError:
        return None


def _fused(x: torch.Tensor) -> ModuleType | None:
    return _triton_module("triton_ops") if x.is_cuda else None


def small_linear_plan(x: torch.Tensor,
                      weight: torch.Tensor) -> tuple[ModuleType, Any] | None:
    """(`triton_linear`, its config) where `small_linear` runs this projection of x (rows,
    features) faster than nn.Linear: on CUDA, for the few rows and the shapes measured so;
    else None (nn.Linear, with the norm as its own kernel)."""
    if not x.is_cuda:
        return None
    ops = _triton_module("triton_linear")
    if ops is None:
        return None
    config = ops.choose_config(x.shape[0], weight.shape[0], weight.shape[1])
    return None if config is None else (ops, config)


class Linear(nn.Linear):
    """nn.Linear that, with `batch_invariant` set, runs `invariant_linear` (below): each row's
    result then does not depend on the rows it is batched with.
    `LlamaForCausalLM.set_batch_invariant` sets it. On the CPU the model's builder packs the
    weight for oneDNN (`pack_for_onednn`)."""

    batch_invariant: bool = False
    packed_weight: torch.Tensor | None = None
    """The weight reordered for `onednn.linear`; `weight` is then empty."""

    def pack_for_onednn(self) -> None:
        """Run through oneDNN with the weight reordered once, and free the plain weight (as
        vLLM's CPU backend does: the model's projections are not kept twice)."""
        if self.batch_invariant:
            raise RuntimeError("a batch-invariant Linear keeps its plain weight")
        self.packed_weight = onednn.pack(self.weight)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return onednn.linear(x, self.packed_weight, self.bias)
        if not self.batch_invariant:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = invariant_linear(flat, self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """self(x) for 2-D x, written into out: the same kernel as `forward` (cuBLAS's
        addmm / mm without batch invariance)."""
        if self.packed_weight is not None:
            return out.copy_(self.forward(x))
        if self.batch_invariant:
            return invariant_linear(x, self.weight, self.bias, out=out)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


ROWS_PER_CALL = 8
"""On the CPU, `invariant_linear` puts rows through the GEMM in calls of exactly this many.
BLAS picks its kernel, and how its threads split the work, by the call's shape, and the
choices round differently. `scripts/probe_cpu_gemm_invariance.py` (BENCHMARKS.md, forty-first
session) on two Intel Xeons with AMX: one call padded to a multiple of 8 rows (the rule
before, enough on the AVX2 and AVX-512 boxes of earlier sessions) gave rows that changed
with the batch in fp32 and bf16 on both; calls of 16, 32 or 64 rows held on the 2-core box but
not on the card host's 16 threads (fp32, K = 1,536); calls of 8 held everywhere (fewer than
8 rows MKL rounds differently again: `invariant_ref.ROW_QUANTUM`). Decode's few rows take one
call as before; a long prefill's projections pay 3x (fp32) to 8x (bf16), a whole SmolLM2
request of 1,000 prompt tokens 14% (fp32) to 32% (bf16) on that box: this mode is for
reproducibility, not speed."""


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (+ bias), each row's bits independent of the other rows and of M.
    CUDA: `triton_matmul.invariant_linear`. CPU: torch's GEMM over the rows padded to a
    multiple of ROWS_PER_CALL, in calls of that many rows."""
    if x.is_cuda:
        ops = _triton_module("triton_matmul")
        if ops is None:
            raise RuntimeError("batch-invariant matmuls on CUDA need Triton")
        return ops.invariant_linear(x, weight, bias, out=out)
    rows = x.shape[0]
    if rows == 0:
        result = F.linear(x, weight, bias)
    else:
        padded = F.pad(x, (0, 0, 0, -rows % ROWS_PER_CALL))
        result = torch.cat([F.linear(chunk, weight, bias)
                            for chunk in padded.split(ROWS_PER_CALL)])[:rows]
    if out is None:
        return result
    return out.copy_(result)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x).
        The fused kernel updates `residual` in place."""
        ops = _fused(x)
        if ops is not None:
            out = ops.add_rmsnorm(x, residual, self.weight, self.eps)
            return out, (x if residual is None else residual)
        if residual is not None:
            x = x + residual
        # HF's x * rsqrt(mean(x^2) + eps) in float32, in one kernel instead of five (the same
        # bits, measured over shapes, dtypes and scales; each op costs 5-20 us on the CPU).
        normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype), x


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: low frequencies divided by `factor`, smooth in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with a precomputed float32 cos/sin table.

    The tables are plain attributes, not buffers: the model is built on the meta device and
    cast to its dtype, and the tables must stay float32 (`materialize` builds them).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.scaling = scaling
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"rope scaling {scaling!r} is not supported")
        self.cos = self.sin = torch.empty(0)

    def materialize(self, device: torch.device) -> None:
        """Compute the float32 tables on `device` (also after the model left the meta device)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device)
        inv_freq = 1.0 / (self.theta ** (exponent.to(torch.float32) / self.head_dim))
        if self.scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        emb = torch.cat((positions[:, None] * inv_freq[None, :],) * 2, dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        """What every layer of a step needs to rotate its queries and keys."""
        if _fused(positions) is not None:
            return RotaryInputs(positions, self.cos, self.sin)
        return RotaryInputs(positions, self.cos[positions].to(dtype)[:, None, :],
                            self.sin[positions].to(dtype)[:, None, :])


@dataclass
class RotaryInputs:
    positions: torch.Tensor
    cos: torch.Tensor
    """Fused path: the float32 table (max_positions, D); torch path: (T, 1, D) rows."""
    sin: torch.Tensor


def apply_rotary(query: torch.Tensor, key: torch.Tensor,
                 rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """query (T, H, D), key (T, KVH, D) -> rotated (in place on CUDA), same shapes and dtype."""
    ops = _fused(query)
    if ops is not None:
        ops.rotary_inplace(query, key, rotary.positions, rotary.cos, rotary.sin)
        return query, key
    cos, sin = rotary.cos, rotary.sin
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def apply_rotary_qk(qk: torch.Tensor, num_q_heads: int,
                    rotary: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """qk (T, H + KVH, D): queries then keys, adjacent as in the fused projection's rows ->
    rotated query (T, H, D) and key (T, KVH, D). The torch path rotates both in one pass (its
    five ops once, not twice: each costs 5-20 us on the CPU); CUDA runs `apply_rotary`."""
    if _fused(qk) is not None:
        return apply_rotary(qk[:, :num_q_heads], qk[:, num_q_heads:], rotary)
    rotated = qk * rotary.cos + _rotate_half(qk) * rotary.sin
    return rotated[:, :num_q_heads], rotated[:, num_q_heads:]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_up_proj(x)))

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(T, 2F) [gate | up] -> (T, F) silu(gate) * up."""
        ops = _fused(gate_up)
        if ops is not None:
            return ops.silu_and_mul(gate_up)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up
