"""`CachedKernel`'s host-side bookkeeping, without a GPU: which parameters a call binds after
its positional arguments, when a launch hook counts as set, and which calls may be cached.
The launches themselves (every specialisation cached apart, graph capture) are checked on the
card by tests/gpu/test_triton_launch.py."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

from kvtier.triton_launch import CachedKernel, _launch_hooks_set  # noqa: E402


@triton.jit
def _kernel(x_ptr, n, stride, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n)
    tl.store(x_ptr + offs, x * x if SQUARE else x, mask=offs < n)


def test_tail_binds_constexprs_and_defaults_in_parameter_order() -> None:
    cached = CachedKernel(_kernel)
    assert cached._leading_runtime == 3
    assert cached._runtime_names == {"x_ptr", "n", "stride"}
    assert cached._bound_tail(3, {"BLOCK": 64, "num_warps": 4}) == (64, False)
    assert cached._bound_tail(3, {"SQUARE": True, "BLOCK": 32}) == (32, True)
    # A runtime argument by keyword lands in the tail too (such calls are never cached).
    assert cached._bound_tail(2, {"stride": 2, "BLOCK": 16}) == (2, 16, False)
    with pytest.raises(TypeError, match="missing argument 'BLOCK'"):
        cached._bound_tail(3, {"num_warps": 4})


def test_a_registered_launch_hook_counts_as_set() -> None:
    """Triton 3.6's hooks are chains that are never None: an empty chain is no hook."""
    assert not _launch_hooks_set()

    def hook(metadata: object) -> None:
        del metadata

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert _launch_hooks_set()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not _launch_hooks_set()
