"""The L2 weight prefetch of small decode batches (`kvtier.model.l2_prefetch`).

Its kernel is inline PTX (the TMA bulk prefetch), which Triton's interpreter cannot run: the
sm_90 build is checked without a GPU (`pytest --noconftest -m gpu -k build`), the rest on one.
That a prefetch leaves a whole decode step's logits bit-identical is gpu_check's decode A/B.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from kernel_support import INTERPRET, compile_sm90  # noqa: E402

from kvtier.model import l2_prefetch  # noqa: E402

ON_GPU = torch.cuda.is_available() and not INTERPRET


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces compiled kernels")
def test_prefetch_kernel_builds_for_hopper() -> None:
    """The kernel compiles for sm_90 into one predicated bulk L2 prefetch per lane."""
    build = compile_sm90(l2_prefetch._l2_prefetch_kernel, {"base_ptr": "*u8", "nbytes": "i64"},
                         dict(LANE_BYTES=l2_prefetch.LANE_BYTES, LANES=l2_prefetch.LANES), 1, 1)
    assert build.ptx.count("cp.async.bulk.prefetch.L2.global") == 1
    assert build.resources["STACK"] == 0 and build.resources["LOCAL"] == 0


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_prefetch_on_a_side_stream_is_captured_and_changes_nothing() -> None:
    """Prefetches forked off a captured stream and joined before the capture ends: the graph
    captures, replays, and the product it wraps is exactly the one computed without them
    (tensor sizes not a multiple of the lane's bytes, a limit, and a tensor too small to
    prefetch at all included)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(4096, 3000, device=device, dtype=torch.bfloat16, generator=gen)
    other = torch.randn(3000, 64, device=device, dtype=torch.bfloat16, generator=gen)
    tiny = torch.randn(100, device=device, dtype=torch.bfloat16, generator=gen)
    x = torch.randn(2, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    expected = (x @ weight) @ other
    prefetcher = l2_prefetch.L2Prefetcher(device)

    def step() -> torch.Tensor:
        prefetcher.prefetch([(weight, None), (other, 1 << 20), (tiny, None)])
        out = (x @ weight) @ other
        prefetcher.join()
        return out

    assert torch.equal(step(), expected)  # eager
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
