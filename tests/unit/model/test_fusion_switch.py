"""`LlamaForCausalLM.set_small_batch_fusion` (the A/B switch of what small CUDA batches fuse)
and `set_batch_invariant` (what `--batch-invariant` switches)."""

from __future__ import annotations

import pytest

from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.architectures import get_architecture
from kvtier.model.layers import Linear
from kvtier.model.llama import FUSIONS, SMALL_BATCH_FUSIONS, LlamaForCausalLM


@pytest.fixture
def model() -> LlamaForCausalLM:
    return LlamaForCausalLM(get_architecture("tiny-llama").spec, TorchAttentionBackend())


def test_every_layer_takes_the_chosen_fusions(model: LlamaForCausalLM) -> None:
    assert all(layer.small_batch_fusions == SMALL_BATCH_FUSIONS for layer in model.layers)
    model.set_small_batch_fusion(["qkv", "down"])
    assert all(layer.small_batch_fusions == {"qkv", "down"} for layer in model.layers)
    model.set_small_batch_fusion([])
    assert all(not layer.small_batch_fusions for layer in model.layers)
    model.set_small_batch_fusion()
    assert all(layer.small_batch_fusions == SMALL_BATCH_FUSIONS for layer in model.layers)
    assert set(FUSIONS) >= SMALL_BATCH_FUSIONS


def test_an_unknown_fusion_is_refused_by_name(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"unknown fusions \['rope'\]"):
        model.set_small_batch_fusion(["qkv", "rope"])
    assert all(layer.small_batch_fusions == SMALL_BATCH_FUSIONS for layer in model.layers)


def test_batch_invariance_reaches_every_projection_and_layer(model: LlamaForCausalLM) -> None:
    """Every projection (q/k/v, o, gate/up, down per layer, and an untied lm_head) is a
    `Linear` that the switch turns over, with each layer (no `small_linear`) and the logits;
    off again restores the default kernels."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * len(model.layers) + (model.lm_head is not None)
    assert not any(m.batch_invariant for m in linears) and not model.batch_invariant
    model.set_batch_invariant(True)
    assert all(m.batch_invariant for m in linears) and model.batch_invariant
    assert all(layer.batch_invariant for layer in model.layers)
    model.set_batch_invariant(False)
    assert not any(m.batch_invariant for m in [*linears, *model.layers])
