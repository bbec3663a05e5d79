"""The disk tier's start-up probe reads as a load does (several chunk files at once, each
checksummed and copied into the device cache) and leaves nothing in the tier's directory;
an unusable disk tier is never worth loading from."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from kvtier.config import ConfigError, TierConfig, TierSpec
from kvtier.kv.block_pool import BlockPool
from kvtier.tiers.cost import PrefillRate
from kvtier.tiers.disk import STALE_PROBE_S, DiskStore
from kvtier.tiers.policy import create_policy
from kvtier.tiers.stack import build_store, build_tier_manager, probe_rate
from kvtier.tiers.transfer import KVTransfer
from kvtier.utils.redis_server import RedisServer
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


def test_a_disk_tier_whose_probe_fails_is_never_worth_loading(tmp_path: Path) -> None:
    """The folder went away between the store's start and its probe."""
    store = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path))
    store.root.rename(tmp_path / "moved-away")
    rate = probe_rate(store, KVTransfer(kv_cache()), CHUNK_BLOCKS)
    assert rate.latency_s >= 1.0 and rate.bytes_per_s <= 1.0


def test_a_dead_process_probe_scratch_is_removed_and_a_running_one_kept(
        tmp_path: Path) -> None:
    first = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path))
    root = first.root
    first.close()
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


def test_a_tier_refused_at_start_closes_the_tiers_started_before_it(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """A redis tier (its event thread and connections running) above a disk tier that is
    refused: building the stack fails, and the redis tier is closed. Before, its thread and
    connections outlived the failed start (an `LLM(...)` that raised kept them)."""
    client = redis.Redis.from_url(redis_server.url)
    config = TierConfig(kv_tiers=(TierSpec("redis", 1 << 30, url=redis_server.url),
                                  TierSpec("disk", 1, path=str(tmp_path / "kv"))),
                        kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size)
    with pytest.raises(ConfigError, match="disk tier of 1 bytes"):
        build_tier_manager(config, LAYOUT, kv_cache(), BlockPool(8), PrefillRate(1e4))
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (
            any(t.name.startswith("kvtier-redis") for t in threading.enumerate())
            or len(client.client_list()) > 1):
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith("kvtier-redis")] == []
    assert [c["cmd"] for c in client.client_list()] == ["client|list"]


@pytest.mark.parametrize("small", ["cpu", "redis"])
def test_a_tier_refused_at_start_leaves_no_directory_of_a_disk_tier_above_it(
        small: str, tmp_path: Path) -> None:
    """`--kv-tier disk:NEW:1GiB --kv-tier cpu:1B`: before, the disk tier had created NEW and
    its namespace directory by the time the cpu tier below it was refused, and they stayed.
    The redis tier is refused by its size before any connection (no server listens here)."""
    new = tmp_path / "new"
    below = TierSpec(small, 1, **({"url": "redis://127.0.0.1:1"} if small == "redis" else {}))
    config = TierConfig(kv_tiers=(TierSpec("disk", 1 << 30, path=str(new)), below),
                        kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size)
    with pytest.raises(ConfigError, match=f"^{small} tier of 1 bytes cannot hold one chunk"):
        build_tier_manager(config, LAYOUT, kv_cache(), BlockPool(8), PrefillRate(1e4))
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_tier_larger_than_the_free_host_memory_is_refused_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As the KV pool is: before, `cpu:100GiB` on a smaller host ended the start in the
    allocator's RuntimeError traceback (or, with overcommit, in the OOM killer later)."""
    chunk_bytes = CHUNK_BLOCKS * LAYOUT.block_bytes
    monkeypatch.setattr("kvtier.tiers.cpu.available_bytes", lambda device: 10 * chunk_bytes)
    with pytest.raises(ConfigError, match=rf"cpu tier of {100 * chunk_bytes} bytes: more than"):
        build_store(TierSpec("cpu", 100 * chunk_bytes), LAYOUT, CHUNK_BLOCKS, pin_memory=False)
    store = build_store(TierSpec("cpu", 10 * chunk_bytes), LAYOUT, CHUNK_BLOCKS,
                        pin_memory=False)
    assert store.capacity_bytes == 10 * chunk_bytes
