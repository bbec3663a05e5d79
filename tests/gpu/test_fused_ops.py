"""Fused Triton elementwise kernels (add+RMSNorm, SiLU-and-mul, rotary) against the torch
reference path of the same layers.

On the GPU: `pytest -m gpu tests/gpu/test_fused_ops.py`. Without one, under Triton's
interpreter: `TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/gpu/test_fused_ops.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from kernel_support import INTERPRET, kernel_device  # noqa: E402

from kvtier.model import triton_ops  # noqa: E402
from kvtier.model.layers import RotaryEmbedding, _rotate_half  # noqa: E402


@pytest.fixture(scope="module")
def device() -> torch.device:
    return kernel_device()


DTYPES = [torch.bfloat16, torch.float16]


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_the_torch_layer(device: torch.device, dtype: torch.dtype,
                                             with_residual: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(37, 576, device=device).to(dtype)
    residual = torch.randn(37, 576, device=device).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(576, device=device)).to(dtype)
    expected_sum = x + residual if residual is not None else x
    expected = reference_norm(expected_sum, weight, 1e-5)
    out = triton_ops.add_rmsnorm(x, residual.clone() if residual is not None else None, weight,
                                 1e-5)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    if residual is not None:
        updated = residual.clone()
        triton_ops.add_rmsnorm(x, updated, weight, 1e-5)
        # On the GPU the sum rounds exactly like torch's add; the interpreter's numpy bf16
        # casts truncate, so there allow one unit in the last place.
        ulp = 0 if not INTERPRET else (2**-7 if dtype == torch.bfloat16 else 2**-10)
        torch.testing.assert_close(updated, expected_sum, atol=0, rtol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(device: torch.device, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    gate_up = torch.randn(9, 2 * 1536, device=device).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up), F.silu(gate) * up,
                               atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(12, 2, 128), (9, 3, 64)])
def test_rotary_in_place_on_fused_qkv_views(device: torch.device, dtype: torch.dtype,
                                            heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(2)
    rotary = RotaryEmbedding(head_dim, 4096, 1e6, None)
    rotary.materialize(device)
    tokens = 23
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    cos = rotary.cos[positions].to(dtype)[:, None, :]
    sin = rotary.sin[positions].to(dtype)[:, None, :]
    expected_q = q * cos + _rotate_half(q) * sin
    expected_k = k * cos + _rotate_half(k) * sin
    triton_ops.rotary_inplace(q, k, positions, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, expected_q, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(k, expected_k, atol=3e-2, rtol=3e-2)
