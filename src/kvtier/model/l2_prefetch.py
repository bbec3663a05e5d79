"""Weights asked of L2 ahead of their projection, on a side stream, during a decode step.

A batch-1 decode step streams the weights (3 GB for Qwen2.5-1.5B) once, but HBM is idle for
much of it: attention, the norms and the small projections are bound by latency, not bytes.
`L2Prefetcher` forks a side stream at such a point and issues TMA bulk prefetches
(`cp.async.bulk.prefetch.L2`, sm_90) of the bytes the next projections will read, so they
arrive from HBM while the main stream waits on latency, and the projections read them from
L2. A prefetch only moves data into the cache: results are bit-identical with it or without.

The side stream joins the main one once per forward pass (`join`), which graph capture needs
(every forked stream must rejoin); it orders nothing else, since nothing reads what it does.
Imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LANE_BYTES = 16384
"""Bytes one lane asks for with one bulk prefetch (a multiple of 16, as the instruction
needs); a program's 32 lanes cover 512 KB."""
LANES = 32


@triton.jit
def _l2_prefetch_kernel(base_ptr, nbytes, LANE_BYTES: tl.constexpr, LANES: tl.constexpr):
    """One bulk L2 prefetch of LANE_BYTES per lane over [0, nbytes) of base (a byte pointer);
    nbytes is a multiple of LANE_BYTES. Lanes past the end issue nothing."""
    lanes = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    offsets = lanes * LANE_BYTES
    inside = (offsets < nbytes).to(tl.int32)
    size = tl.full([LANES], LANE_BYTES, tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [base_ptr + offsets, inside, size], dtype=tl.int32, is_pure=False,
        pack=1)


class L2Prefetcher:
    """Issues prefetches on its own stream, forked from the current one at each call."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self._forked = False

    def prefetch(self, ranges: list[tuple[torch.Tensor, int | None]]) -> None:
        """Ask L2 for the first bytes of each (contiguous) tensor, all of it for None, rounded
        down to LANE_BYTES, starting when the current stream reaches this point."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for tensor, limit in ranges:
                size = tensor.numel() * tensor.element_size()
                nbytes = min(size, size if limit is None else limit) // LANE_BYTES * LANE_BYTES
                if nbytes <= 0:
                    continue
                data = tensor.view(-1).view(torch.uint8)
                _l2_prefetch_kernel[(triton.cdiv(nbytes, LANE_BYTES * LANES),)](
                    data, nbytes, LANE_BYTES=LANE_BYTES, LANES=LANES, num_warps=1)
        self._forked = True

    def join(self) -> None:
        """Make the current stream wait for the prefetches issued since the last join."""
        if self._forked:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._forked = False
