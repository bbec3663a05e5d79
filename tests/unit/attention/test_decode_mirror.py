"""The torch backend's decode mirror gives the same attention as gathering the paged cache.

Each test drives two backends, mirror on and off, through the same sequence of steps over two
identical paged caches: decodes joining and leaving, mixed prefill chunks, steps without decodes,
a sequence whose paged K/V is rewritten while it is away (preemption by recompute), a budget too
small for the mirror, and a layer that skips a step. Outputs and caches must agree every step.
In bfloat16 the mirror attends each row's whole capacity under the mask (stale keys of rows
that other sequences held included), so the same steps run in bfloat16 too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 8


@dataclass
class Seq:
    name: str
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class Harness:
    def __init__(self, num_blocks: int, seed: int, layers: int = 2,
                 dtype: torch.dtype = torch.float32, fill: float = 0.0) -> None:
        self.dtype = dtype
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        shape = (2, num_blocks, BLOCK, KV_HEADS, DIM)
        self.caches = {name: [torch.full(shape, fill, dtype=dtype) for _ in range(layers)]
                       for name in ("mirror", "gather")}
        self.backends = {"mirror": TorchAttentionBackend(contiguous_decode=True),
                         "gather": TorchAttentionBackend(contiguous_decode=False)}

    def grow(self, seq: Seq, new_tokens: int) -> list[int]:
        slots = []
        for position in range(seq.length, seq.length + new_tokens):
            if position // BLOCK == len(seq.blocks):
                seq.blocks.append(self.free.pop())
            slots.append(seq.blocks[position // BLOCK] * BLOCK + position % BLOCK)
        seq.length += new_tokens
        return slots

    def step(self, decodes: list[Seq], prefill: tuple[Seq, int] | None = None,
             layers: list[int] | None = None) -> None:
        """Decode one token for each of `decodes` (and a prefill chunk), on every layer (or
        only `layers`); both backends must agree."""
        chunks = [(seq, 1) for seq in decodes] + ([prefill] if prefill else [])
        slots, starts, lens = [], [0], []
        for seq, n in chunks:
            slots += self.grow(seq, n)
            starts.append(starts[-1] + n)
            lens.append(seq.length)
        width = max(len(seq.blocks) for seq, _ in chunks)
        table = torch.tensor([seq.blocks + [0] * (width - len(seq.blocks)) for seq, _ in chunks],
                             dtype=torch.int32)
        tokens = starts[-1]
        layers = list(range(len(self.caches["mirror"]))) if layers is None else layers
        inputs = [tuple(torch.randn(tokens, heads, DIM, generator=self.gen).to(self.dtype)
                        for heads in (HEADS, KV_HEADS, KV_HEADS)) for _ in layers]
        outputs = {}
        for name, backend in self.backends.items():
            metadata = AttentionMetadata(
                num_tokens=tokens, num_seqs=len(chunks), num_decodes=len(decodes),
                query_start_loc=torch.tensor(starts, dtype=torch.int32),
                seq_lens=torch.tensor(lens, dtype=torch.int32), block_table=table,
                slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc_cpu=starts,
                seq_lens_cpu=lens, max_query_len=max(n for _, n in chunks),
                max_seq_len=max(lens), block_size=BLOCK,
                seq_ids=[seq.name for seq, _ in chunks])
            backend.prepare(metadata)
            outputs[name] = [backend.forward(q, k, v, self.caches[name][layer], metadata, 0.35)
                             for layer, (q, k, v) in zip(layers, inputs, strict=True)]
        tolerance = 1e-5 if self.dtype == torch.float32 else 2e-2
        for mirrored, gathered in zip(outputs["mirror"], outputs["gather"], strict=True):
            torch.testing.assert_close(mirrored, gathered, rtol=tolerance, atol=tolerance)
        for a, b in zip(self.caches["mirror"], self.caches["gather"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit for bit

    def rewrite(self, seq: Seq, layers: list[int] | None = None) -> None:
        """Overwrite a sequence's cached K/V in both caches, as recomputation after preemption
        does (with slightly different floats)."""
        slots = torch.tensor([seq.blocks[p // BLOCK] * BLOCK + p % BLOCK
                              for p in range(seq.length)])
        for layer in range(len(self.caches["mirror"])) if layers is None else layers:
            values = torch.randn(2, len(slots), KV_HEADS, DIM, generator=self.gen).to(self.dtype)
            for name in self.caches:
                self.caches[name][layer].view(2, -1, KV_HEADS, DIM)[:, slots] = values


def prefilled(h: Harness, name: str, length: int) -> Seq:
    seq = Seq(name)
    h.step([], (seq, length))
    return seq


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)


@DTYPES
def test_random_membership_changes_match_gathering(dtype: torch.dtype):
    h = Harness(num_blocks=400, seed=0, dtype=dtype)
    pool = [prefilled(h, f"s{i}", h.rng.randrange(1, 40)) for i in range(6)]
    for _ in range(60):  # lengths cross several capacity growths (64-token quantum)
        decodes = [s for s in pool if h.rng.random() < 0.7]
        h.rng.shuffle(decodes)
        prefill = None
        if h.rng.random() < 0.2:
            prefill = (prefilled_seq := Seq(f"p{_}"), h.rng.randrange(2, 9))
            pool.append(prefilled_seq)
        if decodes or prefill:
            h.step(decodes, prefill)


@DTYPES
def test_a_sequence_recomputed_while_away_is_gathered_again(dtype: torch.dtype):
    h = Harness(num_blocks=64, seed=1, dtype=dtype)
    a, b = prefilled(h, "a", 10), prefilled(h, "b", 7)
    h.step([a, b])
    h.step([a, b])
    h.step([b])  # a is preempted ...
    h.rewrite(a)  # ... and recomputed: its cached K/V change
    h.step([], (Seq("c"), 3))  # a step without decodes
    h.rewrite(b)
    h.step([a, b])  # mirrored rows of a and b must not be reused


def test_a_budget_too_small_falls_back_to_gathering():
    h = Harness(num_blocks=8, seed=2)  # 32 tokens of pool: two 20-token rows exceed 2x that
    a, b = prefilled(h, "a", 12), prefilled(h, "b", 12)
    for _ in range(3):
        h.step([a, b])
    assert h.backends["mirror"]._mirror is not None
    assert not h.backends["mirror"]._mirror._buffers  # never allocated


def test_a_layer_that_missed_a_step_refills_its_rows():
    h = Harness(num_blocks=64, seed=3, layers=2)
    a, b = prefilled(h, "a", 5), prefilled(h, "b", 9)
    h.step([a, b])
    h.step([a, b], layers=[0])  # layer 1 does not run this step ...
    h.rewrite(a, layers=[1])  # ... and its paged cache changes behind the mirror's back
    h.rewrite(b, layers=[1])
    h.step([b, a])


@pytest.mark.parametrize("seed", range(3))
def test_rows_stay_compact_when_sequences_leave(seed: int):
    h = Harness(num_blocks=300, seed=seed)
    seqs = [prefilled(h, f"s{i}", 3 + i) for i in range(8)]
    h.step(seqs)
    h.step(seqs[5:])  # rows of the first five are freed; the rest move down
    h.step(seqs[5:] + seqs[:2])
    mirror = h.backends["mirror"]._mirror
    assert mirror is not None and sorted(row for row, _ in mirror._rows.values()) == list(range(5))


@DTYPES
def test_stale_nan_slots_never_reach_the_output(dtype: torch.dtype):
    """Every slot starts as NaN (a pool's recycled bytes can read as NaN or inf): the slots
    past each sequence's length, in its last block and in the padding of a batch of
    different lengths, must not poison the decode (masked scores give them probability 0,
    but 0 * NaN is NaN), in either backend; `step` checks both outputs agree, NaN-free."""
    h = Harness(num_blocks=60, seed=4, dtype=dtype, fill=float("nan"))
    pool = [prefilled(h, f"s{i}", length) for i, length in enumerate((3, 9, 22))]
    for _ in range(6):
        h.step(pool)

