"""The disk tier's start-up probe reads as a load does (several chunk files at once, each
checksummed and copied into the device cache) and leaves nothing in the tier's directory;
an unusable disk tier is never worth loading from."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from kvtier.config import ConfigError, TierSpec
from kvtier.tiers.disk import STALE_PROBE_S, DiskStore
from kvtier.tiers.policy import create_policy
from kvtier.tiers.stack import build_store, probe_rate
from kvtier.tiers.transfer import KVTransfer
from tests.unit.tiers.test_stores import CHUNK_BLOCKS, LAYOUT, make_meta, put


def kv_cache() -> torch.Tensor:
    return torch.zeros(LAYOUT.num_layers, 2, 4 * CHUNK_BLOCKS, LAYOUT.block_size,
                       LAYOUT.num_kv_heads, LAYOUT.head_dim)


def test_the_disk_probe_measures_and_leaves_no_file_behind(tmp_path: Path) -> None:
    store = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path))
    before = sorted(store.root.iterdir())
    rate = probe_rate(store, KVTransfer(kv_cache()), CHUNK_BLOCKS)
    assert 0 < rate.latency_s < 0.5 and rate.bytes_per_s > 1e5
    assert sorted(store.root.iterdir()) == before
    assert store.num_entries == 0


def test_an_unusable_disk_tier_probes_as_never_worth_loading(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    store = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(blocked))
    assert store.broken
    rate = probe_rate(store, KVTransfer(kv_cache()), CHUNK_BLOCKS)
    assert rate.latency_s >= 1.0 and rate.bytes_per_s <= 1.0


def test_a_dead_process_probe_scratch_is_removed_and_a_running_one_kept(
        tmp_path: Path) -> None:
    root = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path)).root
    stale, running = root / ".probe-stale", root / ".probe-running"
    for scratch in (stale, running):
        scratch.mkdir()
        (scratch / "0.probe").write_bytes(b"x" * 100)
    old = time.time() - 2 * STALE_PROBE_S
    os.utime(stale, (old, old))
    DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path))  # a restart
    assert not stale.exists()
    assert (running / "0.probe").exists()


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_tier_too_small_for_one_chunk_is_refused_at_start(kind: str, tmp_path: Path) -> None:
    """Before, a disk or redis tier smaller than one chunk entry started and refused every
    store without a word (the cpu tier already refused to start)."""
    one_chunk = DiskStore(LAYOUT, 1 << 30, create_policy("lru"),
                          str(tmp_path / "sizer"))._entry_bytes(make_meta(0))
    where = {"path": str(tmp_path / "kv")} if kind == "disk" else {
        "url": f"unix://{tmp_path}/no-such.sock"}
    with pytest.raises(ConfigError, match=f"{kind} tier of {one_chunk - 1} bytes cannot hold "
                                          f"one chunk of {one_chunk} bytes"):
        build_store(TierSpec(kind, one_chunk - 1, **where), LAYOUT, CHUNK_BLOCKS, False)
    if kind == "disk":  # exactly one chunk is enough
        store = build_store(TierSpec(kind, one_chunk, **where), LAYOUT, CHUNK_BLOCKS, False)
        assert put(store, make_meta(1)) and store.has(make_meta(1).key)
