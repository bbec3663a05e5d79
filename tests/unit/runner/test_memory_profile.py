"""The activation profile's dummy step: the largest step, among the longest contexts.

`profile_activation_bytes` measures CUDA memory; here the CUDA counters are stubbed and the
step it runs is inspected, on the CPU."""

from __future__ import annotations

from unittest import mock

import torch

from kvtier.attention import create_backend
from kvtier.attention.base import AttentionMetadata
from kvtier.model.builder import build_model
from kvtier.model.loader import resolve_model
from kvtier.runner import memory


def test_the_profile_step_has_a_block_table_as_wide_as_the_longest_context() -> None:
    """The batch-invariant attention lays out KV splits for the block table's width: a step
    of max_num_batched_tokens among max_model_len contexts allocates more than one among
    short contexts, so the profile's table spans max_context tokens (its prefill still
    reads only its own blocks)."""
    source = resolve_model("random:tiny-qwen2")
    backend = create_backend("torch", "cpu", True)
    model = build_model(source, backend, torch.device("cpu"), torch.float32,
                        batch_invariant=True)
    seen: list[AttentionMetadata] = []
    prepare = backend.prepare

    def recording_prepare(metadata: AttentionMetadata) -> None:
        seen.append(metadata)
        prepare(metadata)

    backend.prepare = recording_prepare  # type: ignore[method-assign]
    stubs = dict(empty_cache=lambda *a, **k: None, synchronize=lambda *a, **k: None,
                 reset_peak_memory_stats=lambda *a, **k: None,
                 memory_allocated=lambda *a, **k: 0, max_memory_allocated=lambda *a, **k: 0)
    with mock.patch.multiple(torch.cuda, **stubs), \
            mock.patch.object(memory, "_sampling_peak_bytes", lambda *a, **k: 0):
        memory.profile_activation_bytes(model, backend, torch.device("cpu"), torch.float32,
                                        num_tokens=256, block_size=16, max_batch=8,
                                        vocab_size=source.spec.vocab_size,
                                        max_context=4096)
    (step,) = seen
    assert step.num_tokens == 256 and step.seq_lens_cpu == [256]
    assert step.block_table.shape == (1, 4096 // 16)
    assert step.block_table[0, :16].tolist() == list(range(16))  # its own blocks first
