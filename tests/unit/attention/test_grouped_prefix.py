"""The torch backend's grouped-matmul path for chunks over a cached prefix equals SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier.attention.torch_ref import _grouped_prefix_attention


@pytest.mark.parametrize(("heads", "kv_heads", "query_len", "context"),
                         [(9, 3, 32, 544), (4, 4, 7, 7), (12, 2, 1, 300), (6, 1, 64, 65)])
def test_grouped_prefix_attention_matches_sdpa(heads: int, kv_heads: int, query_len: int,
                                               context: int):
    gen = torch.Generator().manual_seed(heads * 1000 + query_len)
    q = torch.randn(query_len, heads, 16, generator=gen)
    k = torch.randn(context, kv_heads, 16, generator=gen)
    v = torch.randn(context, kv_heads, 16, generator=gen)
    mask = torch.arange(context)[None, :] <= torch.arange(context - query_len, context)[:, None]
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3,
        enable_gqa=True).transpose(0, 1)
    got = _grouped_prefix_attention(q, k, v, mask, 0.3)
    assert got.shape == (query_len, heads, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
