"""Programmatic dependent launch (PDL) for the Triton kernels of the decode path.

A decode step at batch 1 is a chain of about ten kernels per layer, each a few microseconds,
and the gap between one kernel's last program and the next kernel's first useful load (launch,
block scheduling, the first loads' latency) is a large share of the step. On Hopper a kernel
launched with PDL is scheduled while its predecessor in the stream still runs: its programs
start, do what depends on no earlier kernel (a GEMV issues its first weight loads), then wait
(`griddepcontrol.wait`) until the predecessor has finished and its writes are visible. CUDA
graphs keep these edges (CUDA 12.3+).

PDL is used for launches over at most MAX_ROWS rows (tokens): decode steps of batch 1-2, where
`small_linear` prefetches weights under it. On an H200 the batch-1 decode graph took 1.39 ms
with PDL against 1.51 without; at batch 4, where the projections are cuBLAS's and only the
small elementwise kernels would launch early, graphs were 3% slower with it.

Rules for a kernel launched with PDL (`launch_options(x)` gives its PDL flag, `launch_pdl`):
- before `await_previous_kernel`, it reads only what no kernel writes (weights, tables);
- every program reaches `await_previous_kernel`: a kernel that skipped it could finish before
  its predecessor, and the kernel after it would see the predecessor's writes too early;
- the next kernel is let go (`griddepcontrol.launch_dependents`) only after the wait, so at
  most one kernel runs ahead of the one the data comes from.
Kernels launched without PDL (cuBLAS, torch's) keep the stream's full ordering around them.

`KVTIER_PDL=0` or `set_enabled(False)` turns it off (A/B runs; capture graphs afresh after).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

MAX_ROWS = 2
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SWITCHED_OFF = os.environ.get("KVTIER_PDL", "1") == "0"
"""Read once: `enabled` runs at every launch of the forward pass."""
_override: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force PDL on or off for later launches (of at most MAX_ROWS rows); None: on where the
    device supports it."""
    global _override
    _override = enabled


def enabled(device: torch.device, rows: int) -> bool:
    """Whether a kernel launched now on `device` over `rows` rows uses PDL: CUDA with compute
    capability 9+ (Hopper), at most MAX_ROWS rows, not under Triton's interpreter, unless
    switched off."""
    if device.type != "cuda" or rows > MAX_ROWS or _INTERPRETED:
        return False
    if _override is not None:
        return _override
    if _SWITCHED_OFF:
        return False
    return _capability_major(device.index if device.index is not None
                             else torch.cuda.current_device()) >= 9


def launch_options(x: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for launching a kernel that takes a `PDL` constexpr (and calls
    `await_previous_kernel` with it) over x's rows (its first dimension), on x's device."""
    pdl = enabled(x.device, x.shape[0])
    return {"PDL": pdl, "launch_pdl": pdl}


@cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def await_previous_kernel(PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has finished (its writes visible), then
    let the next kernel start its programs. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
