"""Materialise a model from a `ModelSource` directly on its device and dtype."""

from __future__ import annotations

import torch
from torch import nn

from kvtier.attention.base import AttentionBackend
from kvtier.model import onednn
from kvtier.model.llama import LlamaForCausalLM
from kvtier.model.loader import ModelSource


def build_model(source: ModelSource, backend: AttentionBackend, device: torch.device,
                dtype: torch.dtype, batch_invariant: bool = False) -> LlamaForCausalLM:
    """Build on the meta device, allocate once on `device` in `dtype`, then load the weights.
    On the CPU the projections run through oneDNN with their weights packed once, unless the
    model is batch-invariant (whose kernel is `invariant_linear`'s) or this torch lacks it."""
    with torch.device("meta"):
        model = LlamaForCausalLM(source.spec, backend)
    model = model.to(dtype).to_empty(device=device)
    model.rotary.materialize(device)
    model.load_weights(source.iter_weights(device, dtype))
    if batch_invariant:
        model.set_batch_invariant(True)
    if device.type == "cpu":
        if not batch_invariant and onednn.supports(device, dtype):
            model.pack_for_onednn()
        elif dtype == torch.float32:
            _store_weights_input_major(model)
    return model.eval()


def _store_weights_input_major(model: LlamaForCausalLM) -> None:
    """Keep each (out, in) weight as a transposed view of an (in, out) contiguous buffer.

    `x @ W.t()` then reaches MKL as a plain (not transposed) GEMM, which ran 1.6-2.5x faster
    for decode-sized batches with the torch of the second session (M = 32: 576x3072 in 1.6 ms
    instead of 2.7 ms); torch 2.13 measured no gain. Same values, same shapes; only the memory
    order changes. The CPU's fallback where oneDNN does not pack (batch-invariant models,
    builds without it), in float32 only: MKL has no bf16/fp16 GEMM for a transposed weight,
    and torch's fallback ran 8-50x slower than on the plain (out, in) layout (2-core AVX2
    box, torch 2.13: SmolLM2's logits at 8 rows in bf16 took 1,224 ms instead of 24 ms)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if model.lm_head is None:  # tied: the embedding doubles as the output projection
        weights.append(model.embed_tokens.weight)
    with torch.no_grad():
        for weight in weights:
            weight.data = weight.data.t().contiguous().t()
