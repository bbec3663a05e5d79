"""Triton attention backend against the torch reference (run in fp32 as the oracle).

On a GPU:            pytest -m gpu tests/gpu/test_triton_attention.py
On CPU, through Triton's interpreter (smaller sizes; --noconftest drops the suite's
skip-without-CUDA hook, which would otherwise skip this module):
    TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/gpu/test_triton_attention.py
Plain CPU runs (CI) skip the module: the suite's conftest skips `gpu` tests without CUDA, and
the `device` fixture skips too when neither CUDA nor the interpreter is available.
`test_default_configs_compile_for_hopper` needs no GPU either: it compiles the kernels for sm_90
with Triton's bundled ptxas and checks for spills and wgmma (`pytest --noconftest -m gpu -k
hopper`, without TRITON_INTERPRET).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend

triton = pytest.importorskip("triton")

from kernel_support import INTERPRET, compile_sm90, kernel_device  # noqa: E402

from kvtier.attention import triton_kernels  # noqa: E402
from kvtier.attention.triton_backend import (  # noqa: E402
    DecodeConfig,
    PrefillConfig,
    TritonAttentionBackend,
    TritonStepData,
    choose_num_splits,
    choose_prefill_splits,
    default_decode_config,
    default_prefill_config,
    long_prompt_prefill_config,
)

pytestmark = pytest.mark.gpu

ON_GPU = torch.cuda.is_available() and not INTERPRET
"""Full sizes on a GPU; under the interpreter the same shapes with shorter sequences."""
FILL = 30.0
"""Every cache slot no sequence owns holds this: a kernel that reads one shows a large error."""
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 6e-3}


@pytest.fixture(scope="module")
def device() -> torch.device:
    return kernel_device()


@dataclass
class Step:
    """One random step: decodes then prefill chunks over a randomly paged cache."""

    query: torch.Tensor
    """(T, H, D) view into a fused qkv tensor, as the model passes it (row stride > H * D)."""
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    """(2, num_blocks, bs, KVH, D) with every context token before this step written."""
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: list[list[int]]
    slot_mapping: list[int]
    num_decodes: int
    block_size: int

    def metadata(self, device: torch.device, max_seq_len: int | None = None) -> AttentionMetadata:
        starts = self.query_start_loc
        return AttentionMetadata(
            num_tokens=starts[-1], num_seqs=len(self.seq_lens), num_decodes=self.num_decodes,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            block_table=torch.tensor(self.block_table, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(self.slot_mapping, dtype=torch.int64, device=device),
            query_start_loc_cpu=list(starts), seq_lens_cpu=list(self.seq_lens),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:], strict=False)),
            max_seq_len=max_seq_len or max(self.seq_lens), block_size=self.block_size)


def make_step(decode_lens: list[int], prefills: list[tuple[int, int]], shape: tuple[int, int, int],
              block_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
              table_width: int | None = None) -> Step:
    """decode_lens: context length of each decode (including its new token); prefills:
    (cached prefix length, query length) per chunk; shape: (num_heads, num_kv_heads, head_dim)."""
    num_heads, num_kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    seqs = [(n - 1, 1) for n in decode_lens] + list(prefills)
    blocks_per_seq = [-(-(prefix + q) // block_size) for prefix, q in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0: padding only
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), FILL)
    starts, tables, slots = [0], [], []
    for (prefix, query_len), n in zip(seqs, blocks_per_seq, strict=True):
        table = [free.pop() for _ in range(n)]
        cached = [table[p // block_size] * block_size + p % block_size for p in range(prefix)]
        kv.view(2, -1, num_kv_heads, head_dim)[:, cached] = torch.randn(
            2, prefix, num_kv_heads, head_dim, generator=gen)
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(prefix, prefix + query_len)]
        tables.append(table)
        starts.append(starts[-1] + query_len)
    width = table_width or max(blocks_per_seq)
    tables = [t + [0] * (width - len(t)) for t in tables]
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, dim=-1)
    return Step(q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
                v.view(-1, num_kv_heads, head_dim), kv.to(dtype=dtype, device=device), starts,
                [p + q for p, q in seqs], tables, slots, len(decode_lens), block_size)


def reference(step: Step, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in fp32, cache after the write in the step's dtype) from the torch backend."""
    backend = TorchAttentionBackend()
    metadata = step.metadata(device)
    backend.prepare(metadata)
    cache = step.kv_cache.float()
    out = backend.forward(step.query.float(), step.key.float(), step.value.float(), cache,
                          metadata, step.query.shape[-1] ** -0.5)
    return out, cache.to(step.kv_cache.dtype)


def run_triton(step: Step, backend: TritonAttentionBackend,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    metadata = step.metadata(device)
    backend.prepare(metadata)
    cache = step.kv_cache.clone()
    out = backend.forward(step.query, step.key, step.value, cache, metadata,
                          step.query.shape[-1] ** -0.5)
    return out, cache


def check(step: Step, device: torch.device, backend: TritonAttentionBackend | None = None) -> None:
    out, cache = run_triton(step, backend or TritonAttentionBackend(), device)
    ref_out, ref_cache = reference(step, device)
    assert out.dtype == step.query.dtype and out.shape == step.query.shape
    assert torch.equal(cache, ref_cache), "KV cache after the write differs"
    tol = TOLERANCE[step.query.dtype]
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)


def sizes(gpu: list, cpu: list) -> list:
    return gpu if ON_GPU else cpu


SHAPES = [  # (num_heads, num_kv_heads, head_dim), block_size, dtype
    ((12, 2, 128), 16, torch.bfloat16),  # Qwen2.5-1.5B: GQA 6
    ((4, 4, 64), 32, torch.float16),  # MHA
    ((16, 2, 64), 64, torch.bfloat16),  # GQA 8
    ((9, 3, 64), 16, torch.float16),  # SmolLM2-style GQA 3
    ((8, 1, 128), 32, torch.float16),  # MQA-like GQA 8, d=128
    ((4, 2, 256), 16, torch.bfloat16),  # d=256 (Gemma-style)
]
DECODES = sizes([1, 17, 300, 1025, 4000], [1, 17, 130, 300])
PREFILLS = sizes(  # (prefix, query_len): none, partial block, block-aligned, many blocks, 1 token
    [(0, 700), (5, 300), (64, 129), (1500, 600), (40, 1)],
    [(0, 150), (5, 60), (64, 17), (260, 40), (40, 1)])


def _shape_id(param: tuple) -> str:
    (h, kvh, d), bs, dtype = param
    return f"h{h}-kv{kvh}-d{d}-bs{bs}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed", "mixed-merged"])
@pytest.mark.parametrize("params", SHAPES, ids=_shape_id)
def test_matches_reference(device: torch.device, params: tuple, kind: str) -> None:
    """mixed: the decodes through the decode kernels (more than MAX_MERGED_DECODES of them);
    mixed-merged: the same step with the decodes launched as one-token prefill chunks."""
    shape, block_size, dtype = params
    decodes = DECODES if kind != "prefill" else []
    prefills = PREFILLS if kind != "decode" else []
    step = make_step(decodes, prefills, shape, block_size, dtype, device, seed=1)
    merged = kind == "mixed-merged"
    backend = TritonAttentionBackend(max_merged_decodes=len(decodes) if merged else 0)
    metadata = step.metadata(device)
    backend.prepare(metadata)
    assert metadata.backend_data.num_decodes == (0 if merged else len(decodes))
    check(step, device, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_dtypes_mixed_batch(device: torch.device, dtype: torch.dtype) -> None:
    step = make_step([33, 200], [(0, 90), (20, 45)], (12, 2, 128), 16, dtype, device, seed=2)
    check(step, device)


@pytest.mark.parametrize("num_splits", [None, 1, 7, 37])
def test_long_decode_splits(device: torch.device, num_splits: int | None) -> None:
    """Long contexts over several splits (None: the backend's choice), plus a short one whose
    later splits are empty."""
    lens = sizes([16384, 20001, 40], [2048, 1500, 40])
    step = make_step(lens, [], (12, 2, 128), 16, torch.bfloat16, device, seed=3)
    check(step, device, TritonAttentionBackend(num_decode_splits=num_splits))


@pytest.mark.parametrize("block_size", [16, 64])
def test_small_tiles(device: torch.device, block_size: int) -> None:
    """16x16 tiles: many diagonal tiles, and a tile narrower than a page (BLOCK_N < bs)."""
    backend = TritonAttentionBackend(prefill_config=PrefillConfig(16, 16, 2, 1),
                                     decode_config=DecodeConfig(16, 2, 1), num_decode_splits=5)
    step = make_step([5, 90], [(0, 50), (21, 37), (100, 3)], (8, 2, 64), block_size,
                     torch.bfloat16, device, seed=4)
    check(step, device, backend)


@pytest.mark.parametrize("config", [None, PrefillConfig(16, 16, 2, 1)], ids=["default", "16x16"])
def test_causal_tile_boundaries(device: torch.device, config: PrefillConfig | None) -> None:
    """Prefixes around a multiple of BLOCK_N: the last unmasked tile must end at the first
    row's own position, not one key later."""
    n = 64 if config is None else 16
    prefills = [(n * k + d, 5) for k in (1, 2) for d in (-2, -1, 0, 1)]
    step = make_step([], prefills, (4, 2, 64), 16, torch.float16, device, seed=8)
    check(step, device, TritonAttentionBackend(prefill_config=config))


def test_long_prompt_config(device: torch.device) -> None:
    """Steps without a KV split run `long_prompt_prefill_config` (128-key tiles at d=128):
    few SMs force that choice here, with prompts and prefixes around 128-key boundaries."""
    assert long_prompt_prefill_config(128) != default_prefill_config(128)
    prefills = sizes([(0, 1000), (127, 300), (128, 257), (1000, 129)],
                     [(0, 200), (127, 30), (128, 129), (250, 9)])
    step = make_step([], prefills, (12, 2, 128), 16, torch.bfloat16, device, seed=10)
    backend = TritonAttentionBackend(num_sms=4)
    metadata = step.metadata(device)
    backend.prepare(metadata)
    backend._choose_prefill_tiles(metadata.backend_data, 12, 128)
    assert metadata.backend_data.prefill_config == long_prompt_prefill_config(128)
    assert metadata.backend_data.prefill_splits == 1
    check(step, device, backend)


@pytest.mark.parametrize("config", [None, PrefillConfig(16, 16, 2, 1)], ids=["default", "16x16"])
def test_whole_prompts_read_their_own_kv(device: torch.device, config: PrefillConfig | None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose prefills are all whole prompts reads K/V from the step's key/value rows
    (`prompt_kernel`): lengths around tile boundaries, a one-token prompt, decodes before
    them, a prompt's keys followed by the next prompt's (which it must not see)."""
    from kvtier.attention import triton_backend

    prompts = sizes([(0, 1000), (0, 127), (0, 128), (0, 1), (0, 257)],
                    [(0, 200), (0, 15), (0, 16), (0, 1), (0, 129)])
    step = make_step([40, 7], prompts, (12, 2, 128), 16, torch.bfloat16, device, seed=11)
    calls = []
    real = triton_backend.run_prompts
    monkeypatch.setattr(triton_backend, "run_prompts",
                        lambda *args, **kw: calls.append(1) or real(*args, **kw))
    check(step, device, TritonAttentionBackend(prefill_config=config, num_sms=4))
    assert calls, "the step did not take the own-KV path"
    paged, _ = run_triton(step, TritonAttentionBackend(prefill_config=config, num_sms=4,
                                                       own_kv_prompts=False), device)
    own, _ = run_triton(step, TritonAttentionBackend(prefill_config=config, num_sms=4), device)
    torch.testing.assert_close(own.float(), paged.float(), atol=1e-2, rtol=1e-2)


def test_split_steps_use_split_tiles() -> None:
    """An extend after a long prefix is split over its keys, with the split tiles; a long
    prompt fills the GPU with long-prompt tiles and no split."""
    backend = TritonAttentionBackend(num_sms=132)
    extend = TritonStepData(0, 1, 256, 4352, 0, 256, (256,), 4352)
    backend._choose_prefill_tiles(extend, 12, 128)
    assert extend.prefill_config == default_prefill_config(128)
    assert extend.prefill_splits == choose_prefill_splits(12 * 4, 4352, 132) > 1
    prompt = TritonStepData(0, 1, 8192, 8192, 0, 8192, (8192,), 8192)
    backend._choose_prefill_tiles(prompt, 12, 128)
    assert (prompt.prefill_config, prompt.prefill_splits) == (long_prompt_prefill_config(128), 1)
    # The same prompt known to be whole (no cached prefix) goes to prompt_kernel, whose best
    # tiles are the split ones; the paged kernel keeps the long-prompt tiles.
    whole = TritonStepData(0, 1, 8192, 8192, 0, 8192, (8192,), 8192, whole_prompts=True)
    backend._choose_prefill_tiles(whole, 12, 128)
    assert (whole.prefill_config, whole.prefill_splits) == (default_prefill_config(128), 1)
    paged = TritonAttentionBackend(num_sms=132, own_kv_prompts=False)
    whole.prefill_config = None
    paged._choose_prefill_tiles(whole, 12, 128)
    assert (whole.prefill_config, whole.prefill_splits) == (long_prompt_prefill_config(128), 1)


def test_sharp_softmax(device: torch.device) -> None:
    """Scores far beyond exp2's fp32 range: every max subtraction (tiles, splits) is needed."""
    step = make_step([700, 90], [(30, 40)], (8, 2, 64), 16, torch.float16, device, seed=9)
    step.query.mul_(60.0)
    check(step, device, TritonAttentionBackend(num_decode_splits=4))


def test_write_skips_negative_slots(device: torch.device) -> None:
    step = make_step([20, 40], [], (4, 2, 64), 16, torch.float16, device, seed=5)
    backend = TritonAttentionBackend()
    metadata = step.metadata(device)
    metadata.slot_mapping[1] = -1
    backend.prepare(metadata)
    cache = step.kv_cache.clone()
    backend.forward(step.query, step.key, step.value, cache, metadata, 0.125)
    bs = step.block_size
    first, second = step.slot_mapping
    assert torch.equal(cache[:, first // bs, first % bs], torch.stack([step.key[0],
                                                                       step.value[0]]))
    assert torch.equal(cache[:, second // bs, second % bs],
                       step.kv_cache[:, second // bs, second % bs])


@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_extend_kv_splits(device: torch.device, num_splits: int | None) -> None:
    """Short chunks after long cached prefixes (the tier's extend step), with the keys of each
    tile split (None: the backend's choice): rows before a split's first key see none of it,
    and the shortest prefix leaves later splits empty."""
    prefills = sizes([(4096, 256), (1000, 3), (30, 200)], [(700, 40), (200, 3), (30, 70)])
    step = make_step([90], prefills, (12, 2, 128), 16, torch.bfloat16, device, seed=10)
    check(step, device, TritonAttentionBackend(num_prefill_splits=num_splits))


def test_extend_kv_splits_small_tiles_sharp_softmax(device: torch.device) -> None:
    """16x16 tiles over 5 splits with scores beyond exp2's fp32 range: each split's running
    max starts at -inf for rows that see nothing yet."""
    backend = TritonAttentionBackend(prefill_config=PrefillConfig(16, 16, 2, 1),
                                     num_prefill_splits=5)
    step = make_step([], [(100, 37), (7, 20)], (8, 2, 64), 16, torch.float16, device, seed=11)
    step.query.mul_(60.0)
    check(step, device, backend)


def test_choose_prefill_splits() -> None:
    assert choose_prefill_splits(12 * 64, 8192, 132) == 1  # a long prompt fills the GPU
    assert choose_prefill_splits(24, 4352, 132) == 11  # extend 256 after 4,096: 264 programs
    assert choose_prefill_splits(24, 600, 132) == 3  # capped by 256 keys per split
    assert choose_prefill_splits(1, 1 << 20, 132) == 16  # capped by MAX_PREFILL_SPLITS


def test_choose_num_splits() -> None:
    assert choose_num_splits(256, 2, 4096, 132) == 1
    assert choose_num_splits(1, 2, 4096, 132) == 32  # capped by 128 keys per split
    assert choose_num_splits(1, 2, 65536, 132) == 128  # capped by MAX_SPLITS
    # About 3 programs per SM, never past one wave of 4 per SM (528 programs on 132 SMs).
    assert choose_num_splits(32, 2, 4096, 132) == 7
    assert choose_num_splits(24, 2, 4352, 132) == 9
    assert choose_num_splits(8, 2, 4352, 132) == 25
    assert choose_num_splits(96, 2, 4352, 132) == 2  # 3 would be 576 programs
    assert choose_num_splits(192, 2, 4352, 132) == 1  # 2 would be 768
    assert choose_num_splits(4, 2, 100, 132) == 1


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay(device: torch.device) -> None:
    """Capture one decode step, then replay it for a different batch of the same size: new
    seq_lens, block tables, slots, cache contents and queries, copied in place."""
    shape, bs, width = (12, 2, 128), 16, 512
    first = make_step([100, 3000, 7], [], shape, bs, torch.bfloat16, device, 6, width)
    second = make_step([4000, 1, 2500], [], shape, bs, torch.bfloat16, device, 7, width)
    backend = TritonAttentionBackend()
    metadata = first.metadata(device, max_seq_len=width * bs)
    backend.prepare(metadata)
    num_blocks = max(first.kv_cache.shape[1], second.kv_cache.shape[1])
    cache = torch.zeros((2, num_blocks, *first.kv_cache.shape[2:]), dtype=torch.bfloat16,
                        device=device)
    q, k, v = (t.clone() for t in (first.query, first.key, first.value))
    scale = shape[2] ** -0.5
    backend.forward(q, k, v, cache, metadata, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, metadata, scale)
    fresh = second.metadata(device)
    for name in ("seq_lens", "block_table", "slot_mapping", "query_start_loc"):
        getattr(metadata, name).copy_(getattr(fresh, name))
    cache.zero_()
    cache[:, :second.kv_cache.shape[1]].copy_(second.kv_cache)
    for static, new in ((q, second.query), (k, second.key), (v, second.value)):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = reference(second, device)
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces compiled kernels")
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_default_configs_compile_for_hopper(head_dim: int) -> None:
    """The default tiles compile for sm_90 (no GPU needed) without spilling to local memory,
    within shared memory, and the prefill's dots become wgmma (HGMMA)."""
    bf16 = "*bf16"
    io = {"q_ptr": bf16, "out_ptr": bf16, "cache_ptr": bf16, "block_table_ptr": "*i32",
          "query_start_ptr": "*i32", "seq_lens_ptr": "*i32", "part_ptr": "*fp32",
          "lse_ptr": "*fp32", "qk_scale": "fp32"}
    for pc, direct in ((default_prefill_config(head_dim), False),
                       (default_prefill_config(head_dim), True),
                       (long_prompt_prefill_config(head_dim), True)):
        build = compile_sm90(triton_kernels.prefill_kernel, io, dict(
            NUM_HEADS=12, GROUP=6, HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_M=pc.block_m,
            BLOCK_N=pc.block_n, DIRECT=direct, UPCAST=False), pc.num_warps, pc.num_stages)
        res = build.resources
        assert res["STACK"] == 0 and res["LOCAL"] == 0, res
        assert res["shared_dynamic"] <= 227 * 1024, res
        assert "HGMMA" in build.sass
    pc = default_prefill_config(head_dim)
    descriptor = f"tensordesc<bf16[{pc.block_n}, {head_dim}]>"
    build = compile_sm90(triton_kernels.prompt_kernel, {
        **io, "k_desc": descriptor, "v_desc": descriptor}, dict(
        GROUP=6, HEAD_DIM=head_dim, BLOCK_M=pc.block_m, BLOCK_N=pc.block_n, UPCAST=False),
        pc.num_warps, pc.num_stages)
    res = build.resources
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["shared_dynamic"] <= 227 * 1024, res
    assert "HGMMA" in build.sass and "UTMALDG" in build.sass  # K/V tiles come by TMA
    dc = default_decode_config(head_dim)
    for direct in (False, True):
        build = compile_sm90(triton_kernels.decode_partial_kernel, io, dict(
            NUM_HEADS=12, GROUP=6, BLOCK_G=16, HEAD_DIM=head_dim, BLOCK_SIZE=16,
            BLOCK_N=dc.block_n, DIRECT=direct, UPCAST=False, PDL=True), dc.num_warps,
            dc.num_stages)
        assert build.resources["STACK"] == 0 and build.resources["LOCAL"] == 0, build.resources
        assert "griddepcontrol.wait" in build.ptx  # programmatic dependent launch
    build = compile_sm90(triton_kernels.decode_reduce_kernel, io, dict(
        NUM_HEADS=12, HEAD_DIM=head_dim, BLOCK_S=128, CHUNK=16, PDL=True), 4, 1)
    assert build.resources["STACK"] == 0 and build.resources["LOCAL"] == 0, build.resources
    assert "griddepcontrol.launch_dependents" in build.ptx
