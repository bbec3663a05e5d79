"""Attention backends by name; concrete backends are imported only when created."""

from __future__ import annotations

from kvtier.attention.base import AttentionBackend, AttentionMetadata

BACKENDS = ("torch", "triton")


def create_backend(name: str, device_type: str,
                   batch_invariant: bool = False) -> AttentionBackend:
    """`auto` picks triton on CUDA when it imports, else the torch reference backend.
    batch_invariant: a backend whose output for a query does not depend on the step it runs
    in (triton on CUDA, `InvariantTorchAttentionBackend` on the CPU)."""
    if name == "auto":
        name = "torch"
        if device_type == "cuda":
            try:
                import triton  # noqa: F401

                from kvtier.attention import triton_backend  # noqa: F401
                name = "triton"
            except ImportError:
                name = "torch"
    if batch_invariant and name == "torch":
        if device_type == "cuda":
            raise ValueError("batch invariance on CUDA needs the triton attention backend "
                             "(the torch backend's CUDA matmuls choose their kernels by shape)")
        from kvtier.attention.invariant_ref import InvariantTorchAttentionBackend
        return InvariantTorchAttentionBackend()
    if name == "torch":
        from kvtier.attention.torch_ref import TorchAttentionBackend
        # Contiguous decode K/V pays on the CPU, where gathers run at memory speed; on CUDA the
        # torch backend is the oracle and stays as simple as possible.
        return TorchAttentionBackend(contiguous_decode=device_type == "cpu")
    if name == "triton":
        if device_type != "cuda":
            raise ValueError("attention backend 'triton' needs a CUDA device")
        from kvtier.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(batch_invariant=batch_invariant)
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")


__all__ = ["AttentionBackend", "AttentionMetadata", "create_backend", "BACKENDS"]
