"""Tier stores: index, capacity and pins stay consistent; every disk fault is a clean miss.
The redis store's shared behaviour (replicas, faults) is in test_redis_store.py."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvtier.kv.hashing import hash_block_tokens, root_block_hash
from kvtier.tiers import entry_codec
from kvtier.tiers.base import EntryMeta, KVLayout, TierError, TierStore
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.policy import create_policy
from kvtier.tiers.redis_store import RedisStore
from kvtier.utils.redis_server import RedisServer, redis_server_available

LAYOUT = KVLayout("test-model", "float32", num_layers=2, num_kv_heads=1, head_dim=4,
                  block_size=2, dtype_bytes=4)
CHUNK_BLOCKS = 2
ROOT = root_block_hash("test-model")


def make_meta(seed: int, num_blocks: int = CHUNK_BLOCKS) -> EntryMeta:
    hashes, parent = [], ROOT
    for i in range(num_blocks):
        parent = hash_block_tokens(parent, [seed, i])
        hashes.append(parent)
    return EntryMeta(hashes[-1], tuple(hashes), num_blocks * LAYOUT.block_bytes)


def payload_for(meta: EntryMeta) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int.from_bytes(meta.key[:4], "little"))
    return torch.randint(0, 256, (meta.num_bytes,), dtype=torch.uint8, generator=generator)


def put(store: TierStore, meta: EntryMeta) -> bool:
    handle = store.prepare_store(meta)
    if handle is None:
        return False
    handle.buffer.copy_(payload_for(meta))
    store.complete_store(handle, True)
    return True


def cpu_store(capacity_entries: int = 4, policy: str = "lru") -> CPUStore:
    return CPUStore(LAYOUT, capacity_entries * CHUNK_BLOCKS * LAYOUT.block_bytes,
                    create_policy(policy), CHUNK_BLOCKS, pin_memory=False)


def disk_store(path: Path, capacity_entries: int = 4) -> DiskStore:
    probe = DiskStore(LAYOUT, 1 << 20, create_policy("lru"), str(path / "probe"))
    per_entry = probe._entry_bytes(make_meta(0))  # payload plus its JSON header
    return DiskStore(LAYOUT, capacity_entries * per_entry, create_policy("lru"), str(path))


def redis_store(url: str, capacity_entries: int = 4, policy: str = "lru",
                **options: float) -> RedisStore:
    per_entry = entry_codec.encoded_bytes(make_meta(0), LAYOUT.namespace)
    return RedisStore(LAYOUT, capacity_entries * per_entry, create_policy(policy), url,
                      **options)


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
               capacity_entries: int = 4) -> TierStore:
    if kind == "cpu":
        return cpu_store(capacity_entries)
    if kind == "disk":
        return disk_store(tmp_path, capacity_entries)
    store = redis_store(request.getfixturevalue("redis_server").url, capacity_entries)
    request.addfinalizer(store.close)  # before the server stops: set up after it
    return store


KINDS = ["cpu", "disk", "redis"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_block_level_lookup(kind: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    store = make_store(kind, tmp_path, request)
    meta = make_meta(1)
    assert put(store, meta)
    assert store.locate(meta.block_hashes[0]) == (meta, 0)
    assert store.locate(meta.block_hashes[1]) == (meta, 1)
    assert store.pin(meta.key)
    assert torch.equal(store.read(meta), payload_for(meta))
    store.unpin(meta.key)
    assert store.stats.num_loaded_bytes == meta.num_bytes
    store.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropped", ["partial", "full"])
def test_entries_sharing_blocks_stay_reachable_when_one_goes(
        kind: str, dropped: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A trailing partial chunk (write-through) and later its full chunk hold the same first
    block. Whichever goes first, the other is still found from that block: before, dropping
    the partial one unindexed the block, and the full chunk sat unreachable in capacity."""
    store = make_store(kind, tmp_path, request)
    partial, full = make_meta(5, num_blocks=1), make_meta(5)
    assert partial.block_hashes[0] == full.block_hashes[0]
    assert put(store, partial) and put(store, full)
    assert store.locate(full.block_hashes[0]) == (partial, 0)
    store.remove((partial if dropped == "partial" else full).key)
    kept = full if dropped == "partial" else partial
    assert store.locate(full.block_hashes[0]) == (kept, 0)
    assert (store.locate(full.block_hashes[1]) is not None) == (kept is full)
    store.check_integrity()
    store.remove(kept.key)
    assert store.locate(full.block_hashes[0]) is None
    store.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
def test_capacity_is_never_exceeded_and_pinned_entries_survive(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = make_store(kind, tmp_path, request, capacity_entries=2)
    first, second, third = make_meta(1), make_meta(2), make_meta(3)
    assert put(store, first) and put(store, second)
    store.pin(first.key)
    assert put(store, third)  # evicts `second`, the only unpinned entry
    assert store.has(first.key) and not store.has(second.key) and store.has(third.key)
    store.pin(third.key)
    assert not put(store, make_meta(4))  # everything pinned: refused, counted
    assert store.stats.num_rejected == 1
    assert store.used_bytes <= store.capacity_bytes
    store.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
def test_clear_drops_every_entry_but_those_a_load_holds(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A prefix-cache reset with the tiers: every ready entry goes, with its storage (a disk
    file, a Redis key), except one pinned by a load in flight."""
    store = make_store(kind, tmp_path, request, capacity_entries=4)
    metas = [make_meta(seed) for seed in (1, 2, 3)]
    assert all(put(store, meta) for meta in metas)
    store.pin(metas[0].key)
    assert store.clear() == 2
    assert store.has(metas[0].key) and not any(store.has(m.key) for m in metas[1:])
    assert store.used_bytes == store.charged_bytes(metas[0])
    store.check_integrity()
    if isinstance(store, DiskStore):
        assert [entry_file(store, m).exists() for m in metas] == [True, False, False]
    if kind == "redis":
        store._await_removals()  # type: ignore[attr-defined]
        other = redis_store(request.getfixturevalue("redis_server").url)
        try:
            assert [other.has(m.key) for m in metas] == [True, False, False]
        finally:
            other.close()
    store.unpin(metas[0].key)
    assert store.clear() == 1 and store.num_entries == 0 and store.used_bytes == 0
    store.check_integrity()


def test_disk_index_survives_a_restart(tmp_path: Path) -> None:
    meta = make_meta(7)
    first = disk_store(tmp_path)
    assert put(first, meta)
    first.close()  # the engine's shutdown; the restart then takes the folder's lock
    reopened = disk_store(tmp_path)
    assert reopened.locate(meta.block_hashes[0]) == (meta, 0)
    assert torch.equal(reopened.read(meta), payload_for(meta))
    reopened.check_integrity()


def entry_file(store: DiskStore, meta: EntryMeta) -> Path:
    return store.root / f"{meta.key.hex()}.kvt"


def odd_header(kind: str, store: DiskStore, meta: EntryMeta) -> bytes:
    """A file under meta's name that is torn or whose header has the wrong shape."""
    if kind == "torn":  # cut inside the header-length field
        return b"KVTIER01\x05"
    header = {"namespace": store.layout.namespace, "block_hashes": [meta.key.hex()],
              "num_bytes": meta.num_bytes, "crc32": 0}
    if kind == "no-crc":
        del header["crc32"]
    elif kind == "no-hashes":
        header["block_hashes"] = []
    body = json.dumps([] if kind == "list" else header).encode()
    return b"KVTIER01" + len(body).to_bytes(4, "little") + body + bytes(meta.num_bytes)


ODD_HEADERS = ["torn", "no-crc", "list", "no-hashes"]


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "missing", "bad-header",
                                   *ODD_HEADERS])
def test_disk_faults_are_misses_that_drop_the_entry(fault: str, tmp_path: Path) -> None:
    store = disk_store(tmp_path)
    meta = make_meta(9)
    assert put(store, meta)
    path = entry_file(store, meta)
    data = bytearray(path.read_bytes())
    if fault == "corrupt":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif fault == "truncated":
        path.write_bytes(bytes(data[:-7]))
    elif fault == "missing":
        path.unlink()
    elif fault in ODD_HEADERS:
        path.write_bytes(odd_header(fault, store, meta))
    else:
        path.write_bytes(b"garbage" + bytes(data[7:]))
    store.pin(meta.key)
    with pytest.raises(TierError):
        store.read(meta)
    store.unpin(meta.key)
    assert not store.has(meta.key) and store.locate(meta.block_hashes[0]) is None
    assert store.stats.num_errors == 1
    store.check_integrity()


def test_an_entry_dropped_by_a_failed_read_then_stored_again_keeps_its_pins_whole(
        tmp_path: Path) -> None:
    """A load's read finds the file damaged (the entry is dropped, still pinned), and a store
    of the same prefix lands before the load gives its plan back. Before, that unpin took the
    new entry's pin count below zero: an AssertionError in the scheduler's poll."""
    store = disk_store(tmp_path)
    meta = make_meta(9)
    assert put(store, meta) and store.pin(meta.key)
    entry_file(store, meta).write_bytes(b"garbage")
    with pytest.raises(TierError):
        store.read(meta)
    assert put(store, meta)  # the prefix, recomputed by another request, stored again
    store.unpin(meta.key)  # the failed load gives its plan back
    assert store.pin(meta.key)
    store.unpin(meta.key)
    assert store._entries[meta.key].pins == 0
    store.check_integrity()
    assert store.clear() == 1


@pytest.mark.parametrize("damage", ["bad-json", *ODD_HEADERS])
def test_corrupt_files_are_dropped_when_the_index_is_rebuilt(damage: str,
                                                             tmp_path: Path) -> None:
    """A restart over damaged files starts, keeps the good entries and drops the rest."""
    store = disk_store(tmp_path)
    good, bad = make_meta(1), make_meta(2)
    assert put(store, good) and put(store, bad)
    entry_file(store, bad).write_bytes(b"KVTIER01\x05\x00\x00\x00{oops" if damage == "bad-json"
                                       else odd_header(damage, store, bad))
    store.close()
    reopened = disk_store(tmp_path)
    assert reopened.has(good.key) and not reopened.has(bad.key)
    assert reopened.stats.num_errors == 1
    assert not entry_file(reopened, bad).exists()


@pytest.mark.parametrize("odd", ["dangling-link", "directory", "fifo"])
def test_entries_that_are_no_files_are_skipped_when_the_index_is_rebuilt(
        odd: str, tmp_path: Path) -> None:
    """A name of an entry that is gone when it is looked at (a dangling link, another
    process's clean-up), a directory or a FIFO: a restart keeps the good entries and starts.
    Before, the first two raised out of the store's constructor (the engine did not start)
    and the FIFO's open blocked start-up for good."""
    store = disk_store(tmp_path)
    good, odd_meta = make_meta(1), make_meta(2)
    assert put(store, good)
    path = entry_file(store, odd_meta)
    if odd == "dangling-link":
        path.symlink_to(tmp_path / "nowhere")
    elif odd == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    store.close()
    started: list[DiskStore] = []
    opening = threading.Thread(target=lambda: started.append(disk_store(tmp_path)),
                               daemon=True)
    opening.start()
    opening.join(timeout=5)
    blocked = opening.is_alive()
    if blocked and odd == "fifo":  # end the blocked open: a writer comes
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        opening.join(timeout=5)
    assert not blocked and started, "the store did not start"
    reopened = started[0]
    assert reopened.has(good.key) and not reopened.has(odd_meta.key)
    assert reopened.stats.num_errors == 1
    assert torch.equal(reopened.read(good), payload_for(good))
    reopened.check_integrity()


def test_failed_write_is_counted_and_leaves_no_entry(tmp_path: Path) -> None:
    store = disk_store(tmp_path)
    meta = make_meta(3)
    handle = store.prepare_store(meta)
    assert handle is not None
    store.root.rename(tmp_path / "moved-away")  # the write's directory vanishes
    store.complete_store(handle, True)
    assert not store.has(meta.key) and store.stats.num_errors == 1
    store.check_integrity()


def test_cpu_store_rejects_a_capacity_smaller_than_one_chunk() -> None:
    with pytest.raises(ValueError, match="cannot hold one chunk"):
        CPUStore(LAYOUT, 10, create_policy("lru"), CHUNK_BLOCKS, pin_memory=False)


class StoreMachine(RuleBasedStateMachine):
    """Random store / read / pin / unpin / remove / abandon sequences on a tiny store."""

    def __init__(self) -> None:
        super().__init__()
        self.store = self.new_store()
        self.pins: dict[bytes, int] = {}

    def new_store(self) -> TierStore:
        return cpu_store(3, policy="s3fifo")

    @rule(seed=st.integers(0, 12), blocks=st.integers(1, CHUNK_BLOCKS))
    def store_entry(self, seed: int, blocks: int) -> None:
        meta = make_meta(seed, blocks)
        was_there = self.store.has(meta.key)
        stored = put(self.store, meta)
        if stored:
            assert self.store.has(meta.key)
        elif not was_there:
            assert all(self.pins.get(k, 0) for k in self.store._entries), \
                "refused although an unpinned entry could have been evicted"

    @rule(seed=st.integers(0, 12))
    def abandon_store(self, seed: int) -> None:
        handle = self.store.prepare_store(make_meta(seed))
        if handle is not None:
            self.store.complete_store(handle, False)
            assert not self.store.has(handle.meta.key)

    @rule(seed=st.integers(0, 12), blocks=st.integers(1, CHUNK_BLOCKS))
    def read(self, seed: int, blocks: int) -> None:
        meta = make_meta(seed, blocks)
        if self.store.pin(meta.key):
            assert torch.equal(self.store.read(meta), payload_for(meta))
            self.store.unpin(meta.key)

    @rule(seed=st.integers(0, 12), blocks=st.integers(1, CHUNK_BLOCKS))
    def pin(self, seed: int, blocks: int) -> None:
        meta = make_meta(seed, blocks)
        if self.store.pin(meta.key):
            self.pins[meta.key] = self.pins.get(meta.key, 0) + 1

    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        pinned = sorted(k for k, n in self.pins.items() if n)
        if pinned:
            key = data.draw(st.sampled_from(pinned))
            self.store.unpin(key)
            self.pins[key] -= 1

    @rule(seed=st.integers(0, 12), blocks=st.integers(1, CHUNK_BLOCKS))
    def remove_unpinned(self, seed: int, blocks: int) -> None:
        meta = make_meta(seed, blocks)
        if not self.pins.get(meta.key):
            self.store.remove(meta.key)
            assert not self.store.has(meta.key)

    @invariant()
    def consistent(self) -> None:
        self.store.check_integrity()
        for key, pins in self.pins.items():
            if pins:
                assert self.store.has(key), "a pinned entry was evicted"


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


class RedisStoreMachine(StoreMachine):
    """The same sequences on a redis store, each example on an emptied server: the shared
    index, `used` and the records must agree with the local index at every step."""

    url = ""

    def new_store(self) -> TierStore:
        redis.Redis.from_url(self.url).flushall()
        return redis_store(self.url, 3, policy="s3fifo")

    def teardown(self) -> None:
        self.store.close()


@pytest.fixture(scope="class")
def machine_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if not redis_server_available():
        pytest.skip("needs the redis-server binary")
    server = RedisServer.start(tmp_path_factory.mktemp("redis-machine"))
    RedisStoreMachine.url = server.url
    yield
    server.stop()


TestRedisStoreMachine = pytest.mark.usefixtures("machine_redis")(RedisStoreMachine.TestCase)
TestRedisStoreMachine.settings = settings(max_examples=40, stateful_step_count=30,
                                          deadline=None)
