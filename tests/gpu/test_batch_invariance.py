"""`--batch-invariant`'s kernels: a row computed in different batches comes out with the same
bits (the invariant matmul; the attention backend built batch-invariant), and still close to
the float32 reference.

On a GPU: `pytest -m gpu tests/gpu/test_batch_invariance.py`. Without one, under Triton's
interpreter: `TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/gpu/test_batch_invariance.py`
(the interpreter's dot runs in float64, so a row's result does not follow its neighbours,
as on a tensor core: it checks the kernels' logic, tiles, masks, what a row's arithmetic
may depend on). The CPU's own batch-invariant attention: tests/unit/attention.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import Chunk, Sequences, assert_same_bits, check_rows_are_batch_invariant

triton = pytest.importorskip("triton")

from kernel_support import INTERPRET, kernel_device  # noqa: E402

from kvtier.attention.triton_backend import (  # noqa: E402
    INVARIANT_REDUCE_ROWS,
    INVARIANT_SPLIT_KEYS,
    TritonAttentionBackend,
)
from kvtier.model.triton_matmul import SPLIT_K, invariant_linear, invariant_tile  # noqa: E402

pytestmark = pytest.mark.gpu

ON_GPU = torch.cuda.is_available() and not INTERPRET


@pytest.fixture(scope="module")
def device() -> torch.device:
    return kernel_device()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("long_k", [False, True], ids=["whole-k", "split-k"])
def test_a_matmul_row_has_the_same_bits_in_every_batch(device: torch.device,
                                                       dtype: torch.dtype,
                                                       with_bias: bool, long_k: bool) -> None:
    """Rows alone, a few together, at other offsets of the 64-row tile, in a batch spanning
    several tiles: the same bits as in the batch of all rows. K and N are off the tile sizes
    (K's last tile is zero-filled, N's last tile masked); a long K is split (SPLIT_K ranges,
    the last one shorter) and its partials summed by the second kernel."""
    torch.manual_seed(1)
    rows, in_features, out_features = (300, 1000, 330) if ON_GPU else (150, 200, 150)
    if long_k:
        in_features = 9000 if ON_GPU else 4100
        if not ON_GPU:  # two column tiles, the last masked: the interpreter's time is per tile
            out_features = 80
        assert invariant_tile(out_features, in_features, dtype).split_k == SPLIT_K
    x = torch.randn(rows, in_features, device=device).to(dtype)
    weight = (torch.randn(out_features, in_features, device=device)
              / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, device=device).to(dtype) if with_bias else None
    batch = invariant_linear(x, weight, bias)
    expected = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(batch.double(), expected, atol=tolerance, rtol=tolerance)
    for count, offset in [(1, 0), (1, 77), (3, 5), (2, 63), (64, 10), (65, 70), (130, 1)]:
        alone = invariant_linear(x[offset:offset + count], weight, bias)
        assert torch.equal(alone, batch[offset:offset + count]), (count, offset)


def test_out_and_strided_weights_give_the_same_bits(device: torch.device) -> None:
    """`out=` (the piecewise graphs' static q/k/v buffer) and an input-major weight (how the
    CPU's builder stores weights) take the same arithmetic."""
    torch.manual_seed(2)
    x = torch.randn(9, 96, device=device).to(torch.bfloat16)
    weight = torch.randn(80, 96, device=device).to(torch.bfloat16)
    expected = invariant_linear(x, weight)
    out = torch.empty(9, 80, dtype=torch.bfloat16, device=device)
    assert invariant_linear(x, weight, out=out) is out
    assert torch.equal(out, expected)
    input_major = weight.t().contiguous().t()
    assert input_major.stride(1) != 1
    assert torch.equal(invariant_linear(x, input_major), expected)


def test_bad_operands_are_refused_by_shape(device: torch.device) -> None:
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match=r"x \(4, 32\) and weight \(8, 16\)"):
        invariant_linear(x, torch.randn(8, 16, device=device))
    with pytest.raises(ValueError, match="must share a dtype"):
        invariant_linear(x, torch.randn(8, 32, device=device).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"bias \(4,\) must be \(8,\)"):
        invariant_linear(x, torch.randn(8, 32, device=device), torch.randn(4, device=device))
    with pytest.raises(ValueError, match=r"out must be \(4, 8\)"):
        invariant_linear(x, torch.randn(8, 32, device=device),
                         out=torch.empty(4, 9, device=device))
    assert invariant_linear(x[:0], torch.randn(8, 32, device=device)).shape == (0, 8)


def test_the_tile_depends_on_the_weight_alone() -> None:
    """What keeps rows invariant: the tile is a function of (N, K), never of the batch."""
    assert invariant_tile(17920, 1536).block_n == 128  # gate_up: many column tiles already
    assert invariant_tile(1536, 8960).block_n == 64  # down: spread over more programs
    assert invariant_tile(1536, 8960).split_k == SPLIT_K  # ... and over K
    assert {invariant_tile(n, k).split_k for n, k in [(17920, 1536), (2048, 1536),
                                                     (151936, 1536), (17920, 8960)]} == {1}
    assert {invariant_tile(n, 1536).block_m for n in (256, 2048, 151936)} == {64}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split_keys", [64, INVARIANT_SPLIT_KEYS],
                         ids=["several-splits", "default-splits"])
def test_attention_rows_have_the_same_bits_in_every_step(device: torch.device,
                                                         dtype: torch.dtype,
                                                         split_keys: int) -> None:
    """`check_rows_are_batch_invariant` (tests/helpers.py) for the Triton backend built
    batch-invariant: with 64-key splits the shared sequence's rows span up to 11 (GPU) or 3
    (interpreter) fixed splits, with the default one or (GPU) two."""
    length, prefix = (700 if split_keys == 64 else 2600, 257) if ON_GPU else (150, 37)
    shape = (12, 2, 128) if ON_GPU else (4, 2, 32)
    seqs = Sequences(length, shape, block_size=16, dtype=dtype, device=device)
    # float32 on a GPU: the kernel's dots run in TF32 (10-bit products), as tl.dot does.
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3 if ON_GPU else 1e-4
    check_rows_are_batch_invariant(
        lambda: TritonAttentionBackend(batch_invariant=True, invariant_split_keys=split_keys),
        seqs, prefix, tolerance)


@pytest.mark.parametrize("context_hint", [1, 64], ids=["one-program", "two-programs"])
def test_a_graph_step_shorter_than_the_context_keeps_the_bits(device: torch.device,
                                                              context_hint: int) -> None:
    """A decode graph is captured for a context horizon and a block table as wide as the
    longest context: fewer split programs than the row has splits (each program takes every
    so-many-th split), more splits laid out than used. The decode row keeps its bits."""
    length = 700 if ON_GPU else 150
    shape = (12, 2, 128) if ON_GPU else (4, 2, 32)
    seqs = Sequences(length, shape, block_size=16, dtype=torch.bfloat16, device=device)

    def backend() -> TritonAttentionBackend:
        return TritonAttentionBackend(batch_invariant=True, invariant_split_keys=64)

    whole = seqs.run(backend(), [Chunk(0, length, shared=True)], num_decodes=0)
    decodes = [Chunk(90, 1), Chunk(length - 1, 1, shared=True), Chunk(3, 1)]
    as_graph = seqs.run(backend(), decodes, num_decodes=3, extra_table_columns=9,
                        context_hint=context_hint)
    assert_same_bits(as_graph, whole[length - 1:], "decode in a graph-shaped step")


def test_one_split_laid_out_gives_the_bits_of_the_fold(device: torch.device) -> None:
    """A step whose block table holds one split runs the direct path (no partials, no
    reduce); beside a longer sequence the same rows go through the fixed splits and the
    fold. Their bits must agree: which path a row takes depends on its neighbours."""
    length = 60
    shape = (12, 2, 128) if ON_GPU else (4, 2, 32)
    seqs = Sequences(length, shape, block_size=16, dtype=torch.bfloat16, device=device)

    def backend() -> TritonAttentionBackend:
        return TritonAttentionBackend(batch_invariant=True, invariant_split_keys=64)

    alone = seqs.run(backend(), [Chunk(0, length, shared=True)], num_decodes=0)
    beside_long = seqs.run(backend(), [Chunk(0, 200), Chunk(0, length, shared=True)],
                           num_decodes=0)
    assert_same_bits(beside_long, alone, "one split laid out against several")


def test_a_split_length_off_the_tiles_is_refused() -> None:
    with pytest.raises(ValueError, match="invariant_split_keys 100"):
        TritonAttentionBackend(batch_invariant=True, invariant_split_keys=100)


@pytest.mark.parametrize("shape", [(17920, 1536), (1536, 8960)], ids=["gate_up", "down"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_matmul_tiles_compile_for_hopper(shape: tuple[int, int], dtype: str) -> None:
    """The tiles compile for sm_90 (no GPU needed) without spilling, within shared memory,
    on wgmma (HGMMA) in bf16; float32 takes full-precision products (no TF32 HMMA)."""
    from kernel_support import compile_sm90

    from kvtier.model.triton_matmul import _invariant_matmul_kernel
    if INTERPRET:
        pytest.skip("compiles for the GPU: run without TRITON_INTERPRET")
    tile = invariant_tile(*shape, torch.float32 if dtype == "fp32" else torch.bfloat16)
    pointer = f"*{dtype}"
    build = compile_sm90(_invariant_matmul_kernel, {
        "x_ptr": pointer, "w_ptr": pointer, "b_ptr": pointer,
        "out_ptr": pointer if tile.split_k == 1 else "*fp32"},
        dict(stride_xk=1, stride_wk=1, HAS_BIAS=True, IEEE=dtype == "fp32", UPCAST=False,
             BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8,
             SPLIT_K=tile.split_k),
        tile.num_warps, tile.num_stages, multiples_of_16=("K", "stride_xm", "stride_wn"))
    res = build.resources
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["shared_dynamic"] <= 227 * 1024, res
    if dtype == "bf16":
        assert "HGMMA" in build.sass
    else:
        assert "HGMMA" not in build.sass and "HMMA" not in build.sass


def test_invariant_prefill_tiles_compile_for_hopper() -> None:
    """The prefill kernel as batch invariance runs it (every tile masked, rows packed by KV
    head, fixed-position splits) compiles for sm_90 without spilling, on wgmma; so does the
    fold that merges its splits."""
    from kernel_support import compile_sm90

    from kvtier.attention import triton_kernels
    from kvtier.attention.triton_backend import default_prefill_config
    if INTERPRET:
        pytest.skip("compiles for the GPU: run without TRITON_INTERPRET")
    config = default_prefill_config(128)
    bf16 = "*bf16"
    build = compile_sm90(triton_kernels.prefill_kernel, {
        "q_ptr": bf16, "out_ptr": bf16, "cache_ptr": bf16, "block_table_ptr": "*i32",
        "query_start_ptr": "*i32", "seq_lens_ptr": "*i32", "part_ptr": "*fp32",
        "lse_ptr": "*fp32", "qk_scale": "fp32"}, dict(
        NUM_HEADS=12, GROUP=6, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, DIRECT=False, UPCAST=False, MASK_EVERY_TILE=True,
        PACK_GQA=True, FIXED_SPLITS=True),
        config.num_warps, config.num_stages)
    assert build.resources["STACK"] == 0 and build.resources["LOCAL"] == 0, build.resources
    assert "HGMMA" in build.sass
    fold = compile_sm90(triton_kernels.fixed_split_reduce_kernel, {
        "part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": bf16},
        dict(NUM_HEADS=12, HEAD_DIM=128, ROWS=INVARIANT_REDUCE_ROWS), 4, 1)
    assert fold.resources["STACK"] == 0 and fold.resources["LOCAL"] == 0, fold.resources


@pytest.mark.parametrize("splits", [1, 3], ids=["direct", "kv-splits"])
def test_rows_packed_by_kv_head_have_the_bits_of_unpacked_ones(device: torch.device,
                                                               splits: int) -> None:
    """PACK_GQA regroups the rows of the prefill kernel's tiles (a KV head's query heads
    together); each row's arithmetic must not change: the same bits as one head per program,
    with and without a KV split, for an extend, a whole prompt and a one-token chunk."""
    from test_triton_attention import make_step

    from kvtier.attention.triton_backend import default_prefill_config, run_prefill
    shape = (12, 2, 128) if ON_GPU else (4, 2, 32)
    step = make_step([], [(37, 50), (0, 70), (100, 1)], shape, 16, torch.bfloat16, device)
    metadata = step.metadata(device)
    backend = TritonAttentionBackend(num_prefill_splits=splits, own_kv_prompts=False)
    backend.prepare(metadata)
    config = default_prefill_config(shape[2])
    data = metadata.backend_data
    data.prefill_config, data.prefill_splits = config, splits
    outputs = []
    for packed in (False, True):
        cache = step.kv_cache.clone()
        backend.write_kv(step.key, step.value, cache, metadata.slot_mapping)
        out = torch.zeros_like(step.query)
        run_prefill(step.query, cache, metadata, data, out, shape[2] ** -0.5, config,
                    INTERPRET, mask_every_tile=True, pack_gqa=packed)
        outputs.append(out)
    assert outputs[0].abs().sum() > 0
    assert_same_bits(outputs[1], outputs[0], f"packed rows, {splits} KV splits")
