"""Where the CPU builder does not pack for oneDNN (here: batch-invariant models), float32
weights are stored input-major and bf16/fp16 weights keep torch's plain (out, in) layout:
MKL has no half-precision GEMM for a transposed weight, and torch's fallback for one ran
8-50x slower (SmolLM2's logits at 8 rows: 1,224 ms against 24 ms on a 2-core AVX2 box)."""

from __future__ import annotations

import pytest
import torch

from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.builder import build_model
from kvtier.model.layers import Linear
from kvtier.model.loader import resolve_model

CPU = torch.device("cpu")


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    return weights + [model.embed_tokens.weight]  # tiny-llama ties its logits to it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_weights_keep_the_plain_layout(dtype: torch.dtype) -> None:
    model = build_model(resolve_model("random:tiny-llama"), TorchAttentionBackend(), CPU,
                        dtype, batch_invariant=True)
    weights = _weights(model)
    assert len(weights) == 9 and all(w.dtype == dtype for w in weights)
    assert all(w.is_contiguous() for w in weights)


def test_float32_weights_are_stored_input_major() -> None:
    model = build_model(resolve_model("random:tiny-llama"), TorchAttentionBackend(), CPU,
                        torch.float32, batch_invariant=True)
    weights = _weights(model)
    assert all(w.stride() == (1, w.shape[0]) for w in weights)
