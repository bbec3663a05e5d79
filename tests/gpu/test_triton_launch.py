"""`CachedKernel` launches the kernel `JITFunction.run` would launch, straight from its cache.

Each case runs twice: the first call compiles (or finds) the kernel through Triton's own path,
the second goes through the cached handle. The cases differ in exactly what Triton specialises
on, so a cache keyed too coarsely would replay a kernel compiled for another case: a stride of
1 (a constexpr to Triton) reused for a stride of 2 reads the wrong elements, a 16-byte-aligned
pointer's vectorised loads misread an unaligned one, a bf16 kernel misreads fp32.
On a GPU: pytest -m gpu tests/gpu/test_triton_launch.py
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kvtier.triton_launch import CachedKernel  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, stride_x, BLOCK: tl.constexpr,
                       SQUARE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride_x, mask=mask).to(tl.float32)
    if SQUARE:
        x = x * x
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x * alpha + y).to(out_ptr.dtype.element_ty), mask=mask)


CASES = [  # n, stride, x's offset in elements, dtype, BLOCK, SQUARE
    (37, 1, 0, torch.float32, 32, False),
    (37, 2, 0, torch.float32, 32, False),   # stride 1 is a constexpr to Triton
    (37, 1, 1, torch.float32, 32, False),   # x not 16-byte aligned
    (48, 1, 0, torch.float32, 32, False),   # n a multiple of 16
    (1, 1, 0, torch.float32, 32, False),    # n == 1, a constexpr to Triton
    (37, 1, 0, torch.bfloat16, 32, False),
    (37, 1, 0, torch.float32, 64, False),   # another constexpr
    (37, 1, 0, torch.float32, 32, True),    # a constexpr past its default
]


def _run(launch, n: int, stride: int, offset: int, dtype: torch.dtype, block: int,
         square: bool) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.randn(offset + n * stride, device="cuda").to(dtype)
    x = base[offset:]
    y = torch.randn(n, device="cuda").to(dtype)
    out = torch.empty_like(y)
    kwargs = {"BLOCK": block, "num_warps": 1}
    if square:
        kwargs["SQUARE"] = True
    launch[(triton.cdiv(n, block),)](x, y, out, n, 0.5, stride, **kwargs)
    xs = x[::stride][:n].float()
    expected = (xs * xs if square else xs) * 0.5 + y.float()
    return out.float(), expected


def test_cached_launches_match_each_specialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = CachedKernel(_scaled_add_kernel)
    jit_runs = []
    original_run = _scaled_add_kernel.run
    monkeypatch.setattr(_scaled_add_kernel, "run",
                        lambda *a, **k: jit_runs.append(1) or original_run(*a, **k))
    for case in CASES:
        for attempt in ("through Triton", "cached"):
            out, expected = _run(cached, *case)
            torch.cuda.synchronize()
            tolerance = 2e-2 if case[3] is torch.bfloat16 else 1e-6
            torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance,
                                       msg=lambda m, c=case, a=attempt: f"{c} {a}: {m}")
    keys = list(cached._launches)
    assert len(keys) == len(CASES), keys
    assert len(jit_runs) == len(CASES), (f"{len(jit_runs)} calls through Triton: each case's "
                                         f"second call takes the cached handle", keys)


def test_cached_launch_in_a_cuda_graph() -> None:
    """Captured on the capture stream (the current one), replayed with new inputs."""
    cached = CachedKernel(_scaled_add_kernel)
    n = 300
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = torch.empty_like(x)

    def launch() -> None:
        cached[(triton.cdiv(n, 128),)](x, y, out, n, 2.0, 1, BLOCK=128)

    launch()  # compiles through Triton
    launch()  # cached
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn(n, device="cuda"))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * 2.0 + y)


def test_positional_constexpr_is_not_cached() -> None:
    """A constexpr's value, not its specialisation, picks the kernel: such calls take Triton's
    own path every time (and still compute the right thing)."""
    cached = CachedKernel(_scaled_add_kernel)
    n = 40
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    for block in (16, 32):
        out = torch.empty_like(x)
        cached[(triton.cdiv(n, block),)](x, y, out, n, 1.0, 1, block)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x + y)
    assert not cached._launches


def test_runtime_argument_by_keyword_is_not_cached() -> None:
    """A runtime argument passed by keyword would put its value in the key (a cache entry per
    value): such calls take Triton's own path."""
    cached = CachedKernel(_scaled_add_kernel)
    x, y = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    for n in (40, 50):
        out = torch.zeros_like(x)
        cached[(2,)](x, y, out, n=n, alpha=1.0, stride_x=1, BLOCK=32)
        torch.cuda.synchronize()
        torch.testing.assert_close(out[:n], (x + y)[:n])
        assert not out[n:].any()
    assert not cached._launches
