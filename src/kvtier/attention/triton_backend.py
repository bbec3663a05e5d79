"""Triton paged-attention backend: host side (tile configs, split choice, launches).

Per layer `forward` launches, without a host synchronisation:

    kv_write_kernel        all tokens            grid (num_tokens,)  (unless kv_written)
    decode_partial_kernel  decodes [0, nd)       grid (nd, num_kv_heads, num_splits)
    decode_reduce_kernel   (when num_splits > 1) grid (nd, num_heads)
    prefill_kernel         prefills [nd, n)      grid (num_heads, m_tiles, (n - nd) * kv_splits)
    decode_reduce_kernel   (when kv_splits > 1)  grid (prefill tokens, num_heads)

Batch-invariant (every token a prefill row, packed by KV head; splits at fixed key positions):

    prefill_kernel             all tokens        grid (kv_heads, m_tiles, n * split_programs)
    fixed_split_reduce_kernel  (> 1 split laid out)  grid (cdiv(tokens * num_heads, 16),)

CUDA graphs (decode-only steps): `prepare` runs once at capture, with `max_seq_len` an upper
bound on the contexts the graph will serve; it fixes `num_splits` from the batch shape alone.
Between replays the caller may change, in place: the contents of `block_table` (entries past
a sequence's last block are never read), `seq_lens` (splits are laid out on the device; 0
gives a zero output), `slot_mapping` (a negative slot skips the write) and `query_start_loc`
(unused by decode), and the query/key/value values. It must not change num_decodes,
num_tokens, the table width or the tensors' identities. The split workspace is allocated inside
`forward` (fixed size per shape), so under capture it comes from the graph's private pool and
lives as long as the graph; a buffer made in `prepare` would die with its metadata object while
the graph still wrote to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kvtier.attention import triton_kernels
from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.attention.triton_kernels import prompt_kernel
from kvtier.triton_launch import CachedKernel
from kvtier.triton_pdl import launch_options

# Launched straight through their compiled handles after the first call of each shape (see
# triton_launch): steps outside the decode graphs launch them eagerly, 2-3 per layer.
# prompt_kernel takes tensor descriptors and stays on Triton's own path (whole long prompts,
# whose steps are GPU-bound).
kv_write_kernel = CachedKernel(triton_kernels.kv_write_kernel)
prefill_kernel = CachedKernel(triton_kernels.prefill_kernel)
decode_partial_kernel = CachedKernel(triton_kernels.decode_partial_kernel)
decode_reduce_kernel = CachedKernel(triton_kernels.decode_reduce_kernel)
fixed_split_reduce_kernel = CachedKernel(triton_kernels.fixed_split_reduce_kernel)

LOG2E = 1.4426950408889634
MIN_KEYS_PER_SPLIT = 128
"""A decode split reads at least this many keys (two BLOCK_N=64 tiles) unless the context is
shorter: below that the reduce and the per-program setup cost more than the split saves."""
MAX_SPLITS = 128
MIN_KEYS_PER_PREFILL_SPLIT = 256
"""A prefill KV split attends at least this many keys (four BLOCK_N=64 tiles of 128 rows):
the partial outputs it writes and the reduce cost about what two tiles of attention do."""
MAX_PREFILL_SPLITS = 16
INVARIANT_SPLIT_KEYS = 2048
"""Keys per KV split in batch-invariant mode: splits sit at fixed key positions, so a long
context's decode spreads over programs (P's ~4,400-token contexts: 3 per KV head) where one
program per KV head walked it all. A multiple of every prefill tile's BLOCK_N. On an H200
(`scripts/invariant_splits_ab.py`, Qwen2.5-1.5B shape) 2,048 beat 1,024 everywhere: decode
steps of 64 at 4,352 tokens 5.71 against 6.55 ms (no split: 7.47), prefill of 8,192 tokens
89.3 against 91.7 ms (no split: 85.8), batch-1 graph 2.68 against 2.73 ms (3.13)."""
INVARIANT_REDUCE_ROWS = 16
"""(token, head) rows per program of `fixed_split_reduce_kernel`: an 8,192-token prefill has
98,304 rows a layer, too many to launch a program each."""
MAX_MERGED_DECODES = 4
"""A step with prefill chunks (not all whole prompts) and at most this many decodes launches
the decodes with the prefills, as one-token chunks: one attention launch (and its reduce) per
layer instead of two (and two). Such steps are bound by host time: on an H200 host one layer
of a Q tier hit's step (a 256-token extend after 4,096 cached tokens, three decodes) took 140
us of host time for 55 us of device time with the decode kernels, 66 us for 68 merged
(`scripts/bench_launch_gpu.py`): the prefill kernel reads a decode's K/V once per query head,
not once per KV head (the re-reads come from L2). Many decodes stay with the decode kernel."""
DEFAULT_NUM_SMS = 132
"""H100 SXM; used only when the device is not CUDA (Triton's interpreter)."""


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_config(head_dim: int) -> PrefillConfig:
    """Tiles of steps whose prefill work is split over the keys (extends after a long cached
    prefix, short prompts): 64 query rows x 64 keys, one warpgroup. On an H200
    (scripts/tune_attention.py, one layer, bf16, graph-timed) four 256-token extends after
    4,096 cached tokens took 0.119 ms against 0.166 ms with 128 x 64 tiles (twice the programs,
    so fewer splits and partial outputs); one such extend 0.050-0.054 against 0.046-0.048 ms.
    Whole prompts read by `prompt_kernel` (K/V by TMA) use them too: 8,192 tokens took 0.416
    ms per layer against 0.441 with 128 x 128 tiles, 4,352 tokens 0.132 against 0.144
    (the paged kernel: 0.539 and 0.178 at its best tiles).
    Longer head dims: 64 x 32 tiles (d=256 at 64 x 64 does not fit in registers)."""
    if head_dim <= 128:
        return PrefillConfig(64, 64, 4, 3)
    return PrefillConfig(64, 32, 8, 2)


def long_prompt_prefill_config(head_dim: int) -> PrefillConfig:
    """Steps whose query tiles alone fill the GPU without a KV split (whole long prompts, as in
    the 8,192-token prefill target and Q's first uses): 128 query rows, two warpgroups (each
    owns 64 rows of wgmma). At d=128, 128-key tiles: 8,192 tokens took 0.547 ms per layer
    against 0.631 with 64-key tiles, and 4,352 tokens 0.181 against 0.205 (H200, as above);
    248 registers and 161 KB of shared memory on sm_90, no spills. d=64: 128 x 64 tiles."""
    if head_dim == 128:
        return PrefillConfig(128, 128, 8, 3)
    if head_dim < 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(64, 32, 8, 2)


def default_decode_config(head_dim: int) -> DecodeConfig:
    """Memory-bound: 64-key tiles (16 KB of K and of V at d=128 bf16) loaded with 16-byte
    cp.async, 3 stages in flight; 106-122 registers, 38 KB of shared memory at d=128 (sm_90).
    The 16-row group tile (GROUP <= 16 heads) runs on mma.sync, not wgmma: decode is bound by
    reading K/V, not by math."""
    if head_dim <= 128:
        return DecodeConfig(64, 4, 3)
    return DecodeConfig(32, 4, 2)


DECODE_PROGRAMS_PER_SM = 3
"""Programs of the decode partial kernel per SM that the split count aims at."""
DECODE_RESIDENT_PROGRAMS_PER_SM = 4
"""Programs of the decode partial kernel one SM holds at once (d=128 tiles on sm_90: ~120
registers a thread, 4 warps, 38 KB of shared memory). The split count never spills past this
wave: programs beyond it start only as others end, and the splits of a long context are all
as long, so a grid just over a wave takes nearly two.

Measured on an H200 (`scripts/decode_split_sweep.py`, 28 layers in one graph, P's ~4,400-token
contexts; three calls agreed within ~1%): at every batch from 16 to 192, every grid over 528
programs was slower than the best count under it (batch 24: 12 splits 1.114 ms against 10
splits 1.018; batch 96: 3 splits 4.16 against 2 splits 3.18; batch 192: 2 splits 6.61
against 1 split 5.82), and three programs per SM under that cap was the best count or within
1% of it at every batch from 8 to 192. Aiming at two per SM, as before, was 4-10% slower at
batches 8-64 (batch 24: 6 splits 1.087 ms against 9 splits 1.011); filling the wave to the
brim was 10% slower at batch 8 (33 splits 0.563 ms against 25 splits 0.508; 33 is where the
reduce's BLOCK_S doubles to 64). Short contexts (150-1,500 tokens) gained 3-7% from more
splits than either rule picks, past the wave too: their programs are short, so a second
wave costs little; decode attention does not bound workload S's steps."""


def choose_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int,
                      num_sms: int) -> int:
    """Splits per decode: about DECODE_PROGRAMS_PER_SM programs per SM, never more than one
    resident wave (DECODE_RESIDENT_PROGRAMS_PER_SM) holds, each over at least
    MIN_KEYS_PER_SPLIT keys of the longest context; 1 skips the reduce kernel."""
    pairs = max(num_decodes * num_kv_heads, 1)
    useful = triton.cdiv(max(max_seq_len, 1), MIN_KEYS_PER_SPLIT)
    wanted = min(triton.cdiv(DECODE_PROGRAMS_PER_SM * num_sms, pairs),
                 DECODE_RESIDENT_PROGRAMS_PER_SM * num_sms // pairs)
    return max(1, min(useful, wanted, MAX_SPLITS))


def choose_prefill_splits(num_programs: int, max_context: int, num_sms: int) -> int:
    """KV splits per prefill tile: 1 when the tiles alone fill the GPU (long prompts); else
    enough for about two programs per SM, each over >= MIN_KEYS_PER_PREFILL_SPLIT keys.
    num_programs: heads x query tiles of the step's prefills."""
    if num_programs >= num_sms:
        return 1
    useful = triton.cdiv(max(max_context, 1), MIN_KEYS_PER_PREFILL_SPLIT)
    wanted = triton.cdiv(2 * num_sms, max(num_programs, 1))
    return max(1, min(useful, wanted, MAX_PREFILL_SPLITS))


@dataclass
class TritonStepData:
    num_decodes: int
    """Sequences [0, num_decodes) run through the decode kernels, the rest through the prefill
    kernel (a few decodes join the prefills: MAX_MERGED_DECODES)."""
    num_prefills: int
    max_prefill_query_len: int
    max_seq_len: int
    """Host-known upper bound on decode contexts, for the split choice."""
    first_prefill_token: int = 0
    num_prefill_tokens: int = 0
    prefill_query_lens: tuple[int, ...] = ()
    max_prefill_context: int = 0
    whole_prompts: bool = False
    """No prefill sequence has a cached prefix: all keys are the step's own."""
    prefill_splits: int | None = None
    """KV splits of the prefill kernel; chosen with `prefill_config` by the first layer's
    `forward`, which knows the head count and head dim."""
    prefill_config: PrefillConfig | None = None
    reads_own_kv: bool = False
    """Whole prompts without a KV split: `prompt_kernel` (where the layer's K/V allow TMA)."""
    layout_splits: int = 0
    """Batch-invariant mode: fixed-position splits the block table's width can hold, the
    partial outputs' layout (`prefill_splits` is then the programs per sequence)."""


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    accepts_written_kv = True

    def __init__(self, prefill_config: PrefillConfig | None = None,
                 decode_config: DecodeConfig | None = None,
                 num_decode_splits: int | None = None, num_sms: int | None = None,
                 num_prefill_splits: int | None = None, own_kv_prompts: bool = True,
                 max_merged_decodes: int = MAX_MERGED_DECODES,
                 batch_invariant: bool = False,
                 invariant_split_keys: int = INVARIANT_SPLIT_KEYS) -> None:
        """Configs default per head dim; num_decode_splits / num_prefill_splits fix the split
        counts (else chosen per step by `choose_num_splits` / `choose_prefill_splits`);
        num_sms defaults to the device's. own_kv_prompts: steps of whole prompts read K/V
        from the step's key/value tensors (`prompt_kernel`) rather than from the cache.
        max_merged_decodes: steps with prefills and at most this many decodes launch them
        with the prefills (0: never).

        batch_invariant: every query token, decode or prompt, goes through `prefill_kernel`
        with one tile config and every tile on the masked path, its keys cut into splits of
        invariant_split_keys at fixed positions (FIXED_SPLITS) and folded in split order by
        `fixed_split_reduce_kernel` (a step whose block table holds one split runs without
        them: the same tiles, and the same bits). So its output is the same online softmax
        over the same key tiles (aligned at key 0), merged the same way, whatever step it
        runs in: how its prompt was chunked, how much of it was cached, which requests share
        the step. Tiles past a query's position are fully masked and leave its sums
        unchanged; splits past it are empty and weigh 0. Rows are packed by KV head
        (PACK_GQA), so a decode's K/V is read once per KV head. The other settings (split
        counts, merged decodes, own-KV prompts) then do not apply.
        invariant_split_keys: a multiple of 64 (the prefill tiles' key count)."""
        if invariant_split_keys <= 0 or invariant_split_keys % 64:
            raise ValueError(f"invariant_split_keys {invariant_split_keys} must be a positive "
                             "multiple of 64 (the prefill tiles' key count)")
        self.prefill_config = prefill_config
        self.decode_config = decode_config
        self.num_decode_splits = num_decode_splits
        self.num_prefill_splits = num_prefill_splits
        self.num_sms = num_sms
        self.own_kv_prompts = own_kv_prompts
        self.max_merged_decodes = max_merged_decodes
        self.batch_invariant = batch_invariant
        self.invariant_split_keys = invariant_split_keys
        self.interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv(_last_dim_contiguous(key), _last_dim_contiguous(value), kv_cache, slot_mapping,
                 kv_cache.shape[2])

    def prepare(self, metadata: AttentionMetadata) -> None:
        if self.num_sms is None:
            device = metadata.block_table.device
            self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else DEFAULT_NUM_SMS)
        if self.batch_invariant:
            data = self._step_data(metadata, 0)
            keys = self.invariant_split_keys
            data.layout_splits = triton.cdiv(
                max(metadata.block_table.shape[1] * metadata.block_size, 1), keys)
            data.prefill_splits = min(triton.cdiv(max(data.max_prefill_context, 1), keys),
                                      data.layout_splits)
            metadata.backend_data = data
            return
        data = self._step_data(metadata, metadata.num_decodes)
        if (data.num_prefills and 0 < data.num_decodes <= self.max_merged_decodes
                and not (data.whole_prompts and self.own_kv_prompts)):
            # The decodes launch with the prefills, as one-token chunks. Not with whole
            # prompts: those read their K/V by TMA from the step's rows (`prompt_kernel`).
            data = self._step_data(metadata, 0)
        metadata.backend_data = data

    @staticmethod
    def _step_data(metadata: AttentionMetadata, nd: int) -> TritonStepData:
        """Sequences [0, nd) through the decode kernels, the rest through the prefill ones."""
        starts = metadata.query_start_loc_cpu
        query_lens = tuple(starts[i + 1] - starts[i] for i in range(nd, metadata.num_seqs))
        data = TritonStepData(nd, len(query_lens), max(query_lens, default=0),
                              metadata.max_seq_len)
        if query_lens:
            data.first_prefill_token = starts[nd]
            data.num_prefill_tokens = sum(query_lens)
            data.prefill_query_lens = query_lens
            data.max_prefill_context = max(metadata.seq_lens_cpu[nd:])
            data.whole_prompts = all(
                n == s for n, s in zip(query_lens, metadata.seq_lens_cpu[nd:], strict=True))
        return data

    def num_splits(self, data: TritonStepData, num_kv_heads: int) -> int:
        if self.num_decode_splits is not None:
            return self.num_decode_splits
        return choose_num_splits(data.num_decodes, num_kv_heads, data.max_seq_len,
                                 self.num_sms or DEFAULT_NUM_SMS)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None, kv_written: bool = False) -> torch.Tensor:
        data: TritonStepData = metadata.backend_data
        num_tokens, num_heads, head_dim = query.shape
        _check_shapes(query, key, kv_cache, metadata.block_size)
        query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
        if not kv_written:
            write_kv(key, value, kv_cache, metadata.slot_mapping, metadata.block_size)
        if out is None:
            out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype,
                              device=query.device)
        if data.num_decodes:
            self._decode(query, kv_cache, metadata, data, out, scale)
        if data.num_prefills:
            if data.prefill_config is None:
                self._choose_prefill_tiles(data, num_heads, head_dim)
            assert data.prefill_config is not None
            if data.reads_own_kv and own_kv_readable(key, value):
                run_prompts(query, key, value, metadata, data, out, scale, data.prefill_config,
                            self.interpret)
            else:
                run_prefill(query, kv_cache, metadata, data, out, scale, data.prefill_config,
                            self.interpret, mask_every_tile=self.batch_invariant,
                            pack_gqa=self.batch_invariant,
                            split_keys=self.invariant_split_keys if self.batch_invariant
                            else None)
        return out

    def _choose_prefill_tiles(self, data: TritonStepData, num_heads: int,
                              head_dim: int) -> None:
        """Whole prompts that `prompt_kernel` can take without a KV split: the split tiles (or
        the backend's fixed config), and `reads_own_kv`. Otherwise long-prompt tiles when their
        programs fill the GPU without a KV split, else the split tiles (each with its own split
        count: the tile height sets the program count)."""
        data.reads_own_kv = False
        if self.batch_invariant:  # splits: `prepare`
            data.prefill_config = self.prefill_config or default_prefill_config(head_dim)
            return
        if self.own_kv_prompts and data.whole_prompts:
            config = self.prefill_config or default_prefill_config(head_dim)
            if self._prefill_splits(data, num_heads, config) == 1:
                data.prefill_config, data.prefill_splits = config, 1
                data.reads_own_kv = True
                return
        config = self.prefill_config or long_prompt_prefill_config(head_dim)
        splits = self._prefill_splits(data, num_heads, config)
        if splits > 1 and self.prefill_config is None:
            config = default_prefill_config(head_dim)
            splits = self._prefill_splits(data, num_heads, config)
        data.prefill_config, data.prefill_splits = config, splits

    def _prefill_splits(self, data: TritonStepData, num_heads: int,
                        config: PrefillConfig) -> int:
        if self.num_prefill_splits is not None:
            return self.num_prefill_splits
        tiles = sum(triton.cdiv(n, config.block_m) for n in data.prefill_query_lens)
        return choose_prefill_splits(num_heads * tiles, data.max_prefill_context,
                                     self.num_sms or DEFAULT_NUM_SMS)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                data: TritonStepData, out: torch.Tensor, scale: float) -> None:
        config = self.decode_config or default_decode_config(query.shape[2])
        splits = self.num_splits(data, kv_cache.shape[3])
        run_decode(query, kv_cache, metadata, out, scale, splits, config, self.interpret)


def _check_shapes(query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
                  block_size: int) -> None:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key.shape[1]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"triton attention needs a power-of-two head_dim in [16, 256], "
                         f"got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if kv_cache.shape[2] != block_size or kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be (2, num_blocks, block_size, kv_heads, head_dim) "
                         "with a contiguous last dim")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int) -> None:
    """key, value: (T, KVH, D) -> kv_cache[0/1] at slot_mapping (T,) int64; slot < 0 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    kv_write_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, num_warps=1 if num_kv_heads <= 2 else 2,
        **launch_options(key))


def run_prefill(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                data: TritonStepData, out: torch.Tensor, scale: float, config: PrefillConfig,
                interpret: bool = False, mask_every_tile: bool = False,
                pack_gqa: bool = False, split_keys: int | None = None) -> None:
    """Attention for prefill sequences [num_decodes, num_seqs) into out; (T, H, D) tensors.
    mask_every_tile, pack_gqa: the kernel's MASK_EVERY_TILE and PACK_GQA (batch invariance:
    decodes run here, and packing reads a decode's K/V once per KV head, not per query head).
    split_keys (batch invariance, with mask_every_tile): FIXED_SPLITS of this many keys,
    data.layout_splits of them laid out, data.prefill_splits programs per sequence, folded
    by `fixed_split_reduce_kernel`; with one split laid out, the direct path (no split)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    group = num_heads // kv_cache.shape[3]
    table = metadata.block_table
    programs = data.prefill_splits or 1
    fixed = split_keys is not None and data.layout_splits > 1
    splits = data.layout_splits if fixed else programs
    direct = splits == 1
    first_token = data.first_prefill_token
    if direct:
        part = lse = out  # unused by the kernel
    else:
        # One allocation: partial outputs (tokens, H, S, D) then log-sum-exps (tokens, H, S).
        rows = data.num_prefill_tokens * num_heads * splits
        workspace = torch.empty(rows * (head_dim + 1), dtype=torch.float32, device=query.device)
        part, lse = workspace[:rows * head_dim], workspace[rows * head_dim:]
    packed = group if pack_gqa else 1
    grid = (num_heads // packed, triton.cdiv(data.max_prefill_query_len * packed, config.block_m),
            data.num_prefills * programs)
    prefill_kernel[grid](
        query, out, part, lse, kv_cache, table, metadata.query_start_loc, metadata.seq_lens,
        data.num_decodes, first_token, splits, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        table.stride(0), split_keys or 0, programs,
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=metadata.block_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, DIRECT=direct, UPCAST=interpret,
        MASK_EVERY_TILE=mask_every_tile, PACK_GQA=pack_gqa, FIXED_SPLITS=fixed,
        num_warps=config.num_warps,
        num_stages=config.num_stages)
    if fixed:
        prefill_out = out[first_token:first_token + data.num_prefill_tokens]
        rows = data.num_prefill_tokens * num_heads
        fixed_split_reduce_kernel[(triton.cdiv(rows, INVARIANT_REDUCE_ROWS),)](
            part, lse, prefill_out, rows, splits, prefill_out.stride(0), prefill_out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, ROWS=INVARIANT_REDUCE_ROWS, num_warps=4)
    elif not direct:
        prefill_out = out[first_token:first_token + data.num_prefill_tokens]
        # Without PDL even on steps of <= 2 rows: the prefill kernel before it never lets
        # its dependents start early, so PDL would gain nothing and only add kernel variants
        # for the start-up warm-up to compile.
        decode_reduce_kernel[(data.num_prefill_tokens, num_heads)](
            part, lse, prefill_out, splits, prefill_out.stride(0), prefill_out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(splits), CHUNK=16, num_warps=4, PDL=False,
            launch_pdl=False)


def own_kv_readable(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether tensor descriptors can read key/value (T, KVH, D) as (T, KVH * D) rows: heads
    adjacent within a token, 16-byte aligned base and row stride (TMA's rules)."""
    return all(t.stride(1) == t.shape[2] and t.data_ptr() % 16 == 0
               and t.stride(0) * t.element_size() % 16 == 0 for t in (key, value))


def run_prompts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata, data: TritonStepData, out: torch.Tensor,
                scale: float, config: PrefillConfig, interpret: bool = False) -> None:
    """Attention for whole prompts [num_decodes, num_seqs) into out, K/V from key/value."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    k_desc, v_desc = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim],
                                       [t.stride(0), 1], [config.block_n, head_dim])
                      for t in (key, value))
    grid = (num_heads, triton.cdiv(data.max_prefill_query_len, config.block_m),
            data.num_prefills)
    prompt_kernel[grid](
        query, out, k_desc, v_desc, metadata.query_start_loc, data.num_decodes,
        scale * LOG2E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, UPCAST=interpret, num_warps=config.num_warps,
        num_stages=config.num_stages)


def run_decode(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
               out: torch.Tensor, scale: float, num_splits: int, config: DecodeConfig,
               interpret: bool = False) -> None:
    """Attention for decodes [0, num_decodes) (query token b of sequence b) into out."""
    nd = metadata.num_decodes
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    direct = num_splits == 1
    if direct:
        part = lse = out  # unused by the kernel
    else:
        # One allocation: partial outputs (nd, H, S, D) then log-sum-exps (nd, H, S), fp32.
        rows = nd * num_heads * num_splits
        workspace = torch.empty(rows * (head_dim + 1), dtype=torch.float32, device=query.device)
        part, lse = workspace[:rows * head_dim], workspace[rows * head_dim:]
    table = metadata.block_table
    decode_partial_kernel[(nd, num_kv_heads, num_splits)](
        query, out, part, lse, kv_cache, table, metadata.seq_lens, num_splits, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        table.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=metadata.block_size, BLOCK_N=config.block_n,
        DIRECT=direct, UPCAST=interpret, num_warps=config.num_warps,
        num_stages=config.num_stages, **launch_options(query))
    if not direct:
        decode_reduce_kernel[(nd, num_heads)](
            part, lse, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits), CHUNK=16, num_warps=4,
            **launch_options(query))
