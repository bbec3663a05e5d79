"""`InvariantTorchAttentionBackend` (`--batch-invariant` on the CPU): a query row's output has
the same bits in every step it can run in, and it is attention. The torch backend it stands
in for does not give the same bits (checked here, so the property is not vacuous)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier.attention.invariant_ref import ROW_QUANTUM, InvariantTorchAttentionBackend
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.layers import ROWS_PER_CALL, invariant_linear
from tests.helpers import Chunk, Sequences, check_rows_are_batch_invariant

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 2, 32), (9, 3, 64)], ids=["gqa2", "smollm2"])
def test_rows_have_the_same_bits_in_every_step(dtype: torch.dtype,
                                               shape: tuple[int, int, int]) -> None:
    seqs = Sequences(150, shape, block_size=16, dtype=dtype, device=CPU)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    check_rows_are_batch_invariant(InvariantTorchAttentionBackend, seqs, 37, tolerance)


def test_the_torch_backend_is_not_invariant_where_this_one_is() -> None:
    """What the backend exists for: the reference backend's decode of the last token
    differs from its own prompt pass in the last bits (another kernel, another order)."""
    seqs = Sequences(150, (9, 3, 64), block_size=16, dtype=torch.float32, device=CPU)
    whole = seqs.run(TorchAttentionBackend(), [Chunk(0, 150, shared=True)], num_decodes=0)
    last = seqs.run(TorchAttentionBackend(), [Chunk(90, 1), Chunk(149, 1, shared=True)],
                    num_decodes=2)
    assert not torch.equal(last, whole[149:])
    torch.testing.assert_close(last, whole[149:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(1728, 576), (576, 1536), (49152, 576)])
def test_padded_matmul_rows_have_the_same_bits_in_every_batch(
        dtype: torch.dtype, out_features: int, in_features: int) -> None:
    """The CPU's `invariant_linear`: a row alone, in a few, at other offsets and in a long
    batch has the bits it has in the full batch, with a bias and with the input-major weights
    the CPU builder stores, for SmolLM2's projection shapes (gate_up's, down's, the logits')."""
    torch.manual_seed(0)
    x = torch.randn(300, in_features).to(dtype)
    weight = (torch.randn(out_features, in_features) / 24).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    batches = [(1, 0), (1, 77), (3, 5), (7, 40), (ROW_QUANTUM + 1, 3),
               (ROWS_PER_CALL + 3, 30), (35, 30), (64, 1), (200, 99)]
    for w in (weight, weight.t().contiguous().t()):
        full = invariant_linear(x, w, bias)
        torch.testing.assert_close(full.float(), F.linear(x.float(), w.float(), bias.float()),
                                   atol=5e-2, rtol=5e-2)
        for count, offset in batches:
            alone = invariant_linear(x[offset:offset + count], w, bias)
            assert torch.equal(alone, full[offset:offset + count]), (count, offset)
        out = torch.empty(5, out_features, dtype=dtype)
        assert invariant_linear(x[:5], w, bias, out=out) is out and torch.equal(out, full[:5])
    assert invariant_linear(x[:0], weight, bias).shape == (0, out_features)


def test_a_decode_has_the_same_bits_in_any_decode_group() -> None:
    """Decodes attend DECODES_PER_GROUP at a time: a decode in the second group of a large
    step, beside longer contexts, has the bits of its own prompt pass."""
    from kvtier.attention.invariant_ref import DECODES_PER_GROUP
    seqs = Sequences(150, (9, 3, 64), block_size=16, dtype=torch.float32, device=CPU)
    whole = seqs.run(InvariantTorchAttentionBackend(), [Chunk(0, 150, shared=True)],
                     num_decodes=0)
    others = [Chunk(20 + 13 * i, 1) for i in range(DECODES_PER_GROUP + 3)]
    step = others[:DECODES_PER_GROUP + 1] + [Chunk(149, 1, shared=True)] + others[-2:]
    last = seqs.run(InvariantTorchAttentionBackend(), step, num_decodes=len(step))
    assert torch.equal(last, whole[149:])
