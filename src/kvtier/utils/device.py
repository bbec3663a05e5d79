"""Host values onto the device without blocking the host.

A pageable host-to-device copy waits for the stream's pending work (the forward pass in
flight); through pinned memory with `non_blocking` the host goes on at once. On the CPU the
values stay where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory, without blocking the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def upload_ids(values: Sequence[int] | Sequence[float], device: torch.device,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A list of integers (or of floats, with a float dtype) on `device` (allocated pinned
    directly on CUDA: one copy fewer)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype)


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy into pinned host memory, started without blocking the host;
    read it after an event recorded behind the copy."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
