"""Shared test helpers: run our model on plain sequences without an engine."""

from __future__ import annotations

import torch

from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.llama import LlamaForCausalLM
from kvtier.runner.model_runner import ModelRunner
from kvtier.types import SamplingParams, ScheduledRequest, SchedulerOutput


def full_logits(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16,
                chunk: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Logits at every position of one sequence, through the paged path, in prefill chunks."""
    num_blocks = len(token_ids) // block_size + 2
    runner = ModelRunner(model, model.layers[0].self_attn.backend, num_blocks, block_size,
                         device or torch.device("cpu"), next(model.parameters()).dtype, seed=0)
    block_ids = list(range(num_blocks))
    chunk = chunk or len(token_ids)
    rows = []
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        step = SchedulerOutput([ScheduledRequest("r", piece, start, block_ids, True,
                                                 SamplingParams(), 0)], len(piece))
        input_ids, positions, metadata = runner._prepare_inputs(step)
        with torch.inference_mode():
            hidden = model(input_ids, positions, runner.kv_caches, metadata)
            rows.append(model.compute_logits(hidden))
    return torch.cat(rows)


def new_backend() -> TorchAttentionBackend:
    return TorchAttentionBackend()
