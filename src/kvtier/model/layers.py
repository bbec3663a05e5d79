"""Building blocks of the decoder: RMSNorm, rotary embedding, gated MLP.

Numerics follow HF transformers' Llama/Qwen2 code (norms in float32, rotate-half rotary with
float32 cos/sin tables), so logits match within float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


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

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position: (T, 1, D) in `dtype`, shared by every layer of a step."""
        return (self.cos[positions].to(dtype)[:, None, :],
                self.sin[positions].to(dtype)[:, None, :])


def apply_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query (T, H, D), key (T, KVH, D) -> rotated, same shapes and dtype."""
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
