"""Materialise a model from a `ModelSource` directly on its device and dtype."""

from __future__ import annotations

import torch

from kvtier.attention.base import AttentionBackend
from kvtier.model.llama import LlamaForCausalLM
from kvtier.model.loader import ModelSource


def build_model(source: ModelSource, backend: AttentionBackend, device: torch.device,
                dtype: torch.dtype) -> LlamaForCausalLM:
    """Build on the meta device, allocate once on `device` in `dtype`, then load the weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(source.spec, backend)
    model = model.to(dtype).to_empty(device=device)
    model.rotary.materialize(device)
    model.load_weights(source.iter_weights(device, dtype))
    return model.eval()
