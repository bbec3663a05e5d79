"""The CPU's projections through oneDNN, with each weight reordered once at load.

torch's CPU `F.linear` hands the weight to its GEMM as it lies in memory, which then packs
it again on every call. oneDNN can take a weight reordered once into its own blocked layout
(`mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing and vLLM's CPU backend
use). On this repo's 2-core AMD EPYC box, all of SmolLM2-135M's projections took, per forward
(`scripts/bench_engine_cpu.py`'s shapes, BENCHMARKS.md):

| rows | float32: F.linear (*) / packed | bfloat16: F.linear / packed |
|---:|---:|---:|
| 1 | 21.3 / 11.0 ms | 13.6 / 5.6 ms |
| 32 | 59.1 / 23.0 ms | 20.6 / 12.7 ms |
| 2,048 | 2,053 / 881 ms | 673 / 606 ms |

(*) on input-major weights, the layout the CPU used before packing.

Results are those of a GEMM with another blocking: within float32 rounding of `F.linear` in
float32, the same bits in bfloat16 (measured). A row's result did not depend on how many
rows were multiplied with it (1 to 2,048), where `F.linear`'s did in float32.
"""

from __future__ import annotations

import torch

BATCH_HINT = 32
"""Rows oneDNN picks the packed layout for; every row count runs with it. 1, 32 and 512
measured within 5% of each other at 1, 32 and 2,048 rows."""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build packs weights of this dtype for this device."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight reordered for `linear` (an opaque oneDNN tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) for the weight `pack` reordered; x (..., in)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
