"""On the CPU the builder packs the projections for oneDNN: same results as the plain
weights (within float32 rounding; bfloat16 within its own), the plain weights freed, the
logits through the packed copy, and batch-invariant models left to `invariant_linear`."""

from __future__ import annotations

import pytest
import torch

from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model import onednn
from kvtier.model.builder import build_model
from kvtier.model.layers import Linear
from kvtier.model.loader import resolve_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not onednn.supports(CPU, torch.float32),
                                reason="this torch has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_computes_what_the_plain_one_does(dtype: torch.dtype, bias: bool):
    if not onednn.supports(CPU, dtype):
        pytest.skip(f"oneDNN has no {dtype} here")
    torch.manual_seed(0)
    plain = Linear(96, 160, bias=bias).to(dtype)
    packed = Linear(96, 160, bias=bias).to(dtype)
    packed.load_state_dict(plain.state_dict())
    packed.pack_for_onednn()
    assert packed.weight.numel() == 0  # the plain copy is freed
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for shape in ((1, 96), (7, 96), (3, 5, 96)):
        x = torch.randn(shape).to(dtype)
        torch.testing.assert_close(packed(x), plain(x), rtol=tolerance, atol=tolerance)
        if len(shape) == 2:
            out = torch.empty(shape[0], 160, dtype=dtype)
            assert packed.forward_into(x, out) is out
            torch.testing.assert_close(out, plain(x), rtol=tolerance, atol=tolerance)


def test_the_built_model_is_packed_and_its_logits_are_the_plain_models():
    source = resolve_model("random:tiny-qwen2")
    packed = build_model(source, TorchAttentionBackend(), CPU, torch.float32)
    plain = build_model(source, TorchAttentionBackend(), CPU, torch.float32,
                        batch_invariant=True)
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed_weight is not None and m.weight.numel() == 0
                           for m in linears)
    assert packed.packed_logits_weight is not None
    assert plain.packed_logits_weight is None  # batch-invariant: invariant_linear's kernel
    assert all(m.packed_weight is None for m in plain.modules() if isinstance(m, Linear))
    hidden = torch.randn(5, source.spec.hidden_size)
    torch.testing.assert_close(packed.compute_logits(hidden), plain.compute_logits(hidden),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="packed for oneDNN"):
        packed.set_batch_invariant(True)
